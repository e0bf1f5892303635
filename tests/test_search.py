"""Exact chunked search equals a full matmul, and so does the bfloat16-ranked one; faiss indexes agree with it."""

import numpy as np
import pytest
import torch

import relict_callbacks as rc
from relict_callbacks import search
from relict_callbacks.search import FaissIndex, RankedRows, inner_product_topk, ranking_bases
from relict_callbacks.separable import along_axes

from conftest import on_threads, smooth_field


def test_chunked_topk_equals_full_topk_for_any_chunk_size(rng):
    refs = rng.standard_normal((103, 40)).astype(np.float16)
    queries = torch.from_numpy(rng.standard_normal((7, 40)).astype(np.float32))
    full = (queries @ torch.from_numpy(refs).float().T).topk(5, dim=1)
    for chunk in (1, 10, 64, 500):
        values, indices = inner_product_topk(queries, refs, 5, chunk_size=chunk)
        assert torch.equal(indices, full.indices)
        assert torch.allclose(values, full.values, atol=1e-5)


def test_exclude_skips_each_querys_own_row(rng):
    refs = rng.standard_normal((20, 8)).astype(np.float32)
    queries = torch.from_numpy(refs[[3, 11]])
    _, indices = inner_product_topk(queries, refs, 1, chunk_size=6, exclude=torch.tensor([3, 11]))
    assert 3 not in indices[0] and 11 not in indices[1]


def ncc_rows(images: np.ndarray) -> np.ndarray:
    """Z-scored rows, float16 as a voxel bank stores them."""
    flat = images.reshape(len(images), -1)
    return ((flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)).astype(np.float16)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("spread", [1.0, 0.02, 1e-3], ids=["apart", "close", "tied-beyond-the-bound"])
def test_bfloat16_ranked_search_returns_the_float32_neighbours_and_scores(spread, k, rng, monkeypatch):
    """Rows far apart are proven from the first few re-scored; rows closer than bfloat16 can tell apart need deeper
    re-scoring, and 300 rows within its rounding of each other the full float32 search: the answer is the same."""
    base = rng.standard_normal((1, 4096))
    refs = ncc_rows(base + spread * rng.standard_normal((300, 4096)))
    exact = torch.from_numpy(refs).float()
    noise = torch.from_numpy(rng.standard_normal((4, 4096))).float()
    queries = (exact[[3, 100, 250, 299]] + 0.5 * spread * noise) / 4096  # NCC: z / voxel count
    exclude = torch.tensor([3, -1, 7, -1])
    calls = []
    monkeypatch.setattr(search, "_exact_scores", lambda *a: calls.append(a[2].shape) or exact_scores(*a))
    values, indices = inner_product_topk(queries, RankedRows(refs), k, exclude=exclude)
    expected_values, expected_indices = inner_product_topk(queries, refs, k, exclude=exclude)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(values, expected_values, atol=1e-6, rtol=0)
    assert 3 not in indices[0] and 7 not in indices[2]
    rescored = sum(int(np.prod(shape)) for shape in calls)
    if k == 1 and spread == 1.0:  # each query's best 4 rows prove it, but the one whose own row is excluded
        assert rescored <= 3 * 4 + 64
    if spread == 1e-3:  # not even all 64 ranked rows do
        assert rescored == 4 * 64


exact_scores = search._exact_scores


@pytest.mark.parametrize("rows_per_block", [1, 3, 8, 1000])
def test_exact_rescoring_in_blocks_equals_the_full_products(rows_per_block, rng, monkeypatch):
    """Blocks of whole queries, of part of one query's rows, or of single rows give the same products."""
    refs = RankedRows(ncc_rows(rng.standard_normal((30, 2, 64))))
    queries = torch.from_numpy(rng.standard_normal((5, 128))).float()
    indices = torch.from_numpy(rng.integers(0, 30, (5, 4)))
    monkeypatch.setattr(search, "RESCORE_BYTES", rows_per_block * 4 * 128)
    expected = torch.einsum("qmd,qd->qm", torch.from_numpy(refs.exact).float().reshape(30, -1)[indices], queries)
    assert torch.allclose(exact_scores(queries, refs, indices), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [3, 9])
def test_bfloat16_ranked_search_of_a_small_bank_checks_every_row_a_query_may_match(k, rng):
    """With fewer rows than it re-scores, a query that excludes nothing (-1) still has one row more to rank."""
    refs = ncc_rows(rng.standard_normal((1, 256)) + 1e-3 * rng.standard_normal((10, 256)))  # tied within bfloat16
    for seed in range(20):
        queries = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, 256))).float() / 256
        queries += torch.from_numpy(refs[[4, 6]]).float() / 256
        exclude = torch.tensor([-1, 6])
        values, indices = inner_product_topk(queries, RankedRows(refs), k, exclude=exclude)
        expected_values, expected_indices = inner_product_topk(queries, refs, k, exclude=exclude)
        assert torch.equal(indices.sort().values, expected_indices.sort().values)  # ties within float32 sums may swap
        assert torch.allclose(values, expected_values, atol=1e-6, rtol=0)


def image_rows(n: int, shape: tuple[int, ...], seed: int, smoothing: int = 3, channels: int = 1) -> np.ndarray:
    """``n`` z-scored float16 images ``[n, channels, *shape]``, blurred ``smoothing`` times (0: white noise)."""
    x = smooth_field(n, shape, seed, channels, passes=smoothing)
    return ncc_rows(x.numpy()).reshape(n, channels, *shape)


def test_bfloat16_bound_holds_for_every_row_whatever_the_query(rng):
    """The bound is a proof: no exact product (float64, and float32 as the search sums it) exceeds it, for random
    queries, queries equal to a row, queries aligned with a row's bfloat16 rounding error (and rounding to
    themselves), and queries whose own rounding error is aligned with a row."""
    refs = RankedRows(ncc_rows(rng.standard_normal((1, 65536)) + rng.standard_normal((40, 65536))))
    stored = torch.from_numpy(refs.exact).double()
    rounding = stored - refs.ranking.double()
    _, exponent = torch.frexp(refs.ranking[:8].float())  # a bfloat16 value's spacing is 2 ** (exponent - 8)
    half_step_up = refs.ranking[:8].double() + 0.49 * torch.ldexp(torch.ones(1), exponent - 8) * stored[:8].sign()
    for queries in (torch.from_numpy(rng.standard_normal((8, 65536))), stored[:8],
                    stored[:8] + 40 * rounding[:8], (1e3 * rounding[:8]).bfloat16().double(), half_step_up):
        assert_bound_holds(refs, (queries / 65536).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("shape", [(128, 128), (32, 32, 32)], ids=["2d", "3d"])
def test_low_frequency_bound_holds_for_every_row_whatever_the_query(shape, dtype, rng):
    """Smooth images are ranked by their low frequencies, and the bound still proves: for white-noise queries (all
    but a quarter or an eighth of them outside the ranking), queries equal to a row, queries that are a row's
    high frequencies only (the part of the product the ranking does not see) and rows with those amplified."""
    rows = image_rows(40, shape, seed=1)
    refs = RankedRows(rows, ranking_bases(rows), dtype)
    assert refs.bases is not None and refs.ranking.shape[1] == np.prod(shape) // 2 ** len(shape)
    stored = torch.from_numpy(refs.exact).double().flatten(1)
    images = stored[:8].float().view(-1, *refs.image_shape)
    rest = (images - along_axes(along_axes(images, refs.bases), [b.T for b in refs.bases])).flatten(1)
    voxels = stored.shape[1]
    for queries in (torch.from_numpy(rng.standard_normal((8, voxels))), stored[:8], rest.double(),
                    stored[:8] + 30 * rest.double()):
        assert_bound_holds(refs, (queries / voxels).float())


def assert_bound_holds(refs: RankedRows, queries: torch.Tensor) -> None:
    stored = torch.from_numpy(refs.exact).double().flatten(1)
    ranked, rests, slack = refs.rank(queries)
    exact = queries.double() @ stored.T
    keys = ranked.double() @ refs.ranking.double().T  # before the product's own rounding
    if rests is not None:
        keys += rests.double()[:, None] * refs.rest_norms.double()
    assert (exact - keys <= slack[:, None]).all()
    bound = refs.bound(refs.keys(ranked, rests, 0, len(refs)), slack[:, None])
    assert (exact <= bound).all()
    assert (queries @ stored.float().T <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("shape, channels", [((128, 128), 1), ((64, 64), 2), ((64, 64, 64), 1)],
                         ids=["2d", "2d-two-channels", "3d"])
def test_images_ranked_by_their_low_frequencies_give_the_float32_neighbours_from_few_rows(shape, channels, dtype,
                                                                                          monkeypatch):
    """Ranked by a quarter (2D) or an eighth (3D) of their values, in bfloat16 or (CPUs without it) in float32,
    smooth images give the float32 search's top-k, and each query's best 4 ranked rows prove its nearest neighbour
    (all but at most 2 of 16: mirrored, noisy and unrelated queries included)."""
    rows = image_rows(60, shape, seed=2, channels=channels)
    refs = RankedRows(rows, ranking_bases(rows), dtype)
    assert refs.bases is not None and refs.ranking.shape[1] == channels * np.prod(shape) // 2 ** len(shape)
    exact = torch.from_numpy(rows).float()
    queries = torch.cat([exact[:4], exact[4:8].flip(-1), exact[8:12] + torch.randn(4, *exact.shape[1:]),
                         torch.from_numpy(image_rows(4, shape, seed=3, channels=channels)).float()])
    queries = queries.flatten(1) / exact[0].numel()
    calls = []
    monkeypatch.setattr(search, "_exact_scores", lambda *a: calls.append(a[2].shape) or exact_scores(*a))
    for k, exclude in ((1, None), (3, torch.arange(16))):
        calls.clear()
        values, indices = inner_product_topk(queries, refs.reshape(60, -1), k, exclude=exclude)
        expected_values, expected_indices = inner_product_topk(queries, rows.reshape(60, -1), k, exclude=exclude)
        assert torch.equal(indices, expected_indices)
        assert torch.allclose(values, expected_values, atol=1e-5, rtol=0)  # sums of 262,144 in another order
        if k == 1:  # the first round's 4 rows a query prove all but at most 2 of them
            assert calls[0] == (16, 4) and sum(shape[0] for shape in calls[1:2]) <= 2


def test_rows_are_ranked_in_pieces_as_they_would_be_all_at_once():
    """Queries and rows are transformed for the ranking a few at a time (so that the allocator reuses the pieces'
    memory rather than mapping new pages at every search), and each piece is transformed as the whole batch is, on 1,
    2 and 4 threads."""
    rows = torch.from_numpy(image_rows(9, (64, 64, 64), seed=4)).float().flatten(1)
    bases = ranking_bases(rows.view(9, 1, 64, 64, 64).numpy())
    assert len(search.row_pieces(len(rows), 4 * rows.shape[1])) > 1
    for pieces, whole in on_threads(lambda: (search._split(rows, (1, 64, 64, 64), bases),
                                             search._split_piece(rows, (1, 64, 64, 64), bases)), (1, 2, 4)):
        assert all(torch.equal(a, b) for a, b in zip(pieces, whole))


def test_a_noisy_row_does_not_loosen_the_bound_of_the_others(monkeypatch):
    """Each row's rest counts on its own: a bank of similar smooth images (NCC about 0.97 with each other) with two
    rows of white noise among them still proves each smooth query's nearest neighbour from its best 4 ranked rows
    (with the noisiest row's rest counted for every row, each query took all 64)."""
    base, own = image_rows(1, (64, 64), seed=6).astype(np.float32), image_rows(60, (64, 64), seed=8)
    rows = ncc_rows(base + 0.17 * own).reshape(60, 1, 64, 64)
    bases = ranking_bases(rows)  # as a bank whose first rows are smooth gets them
    rows[[10, 40]] = image_rows(2, (64, 64), seed=7, smoothing=0)
    refs = RankedRows(rows, bases)
    assert refs.bases is not None and refs.largest_rest > 0.5 * refs.largest_norm
    queries = torch.from_numpy(rows[[0, 20, 30, 50]]).float().flatten(1) / 4096
    calls = []
    monkeypatch.setattr(search, "_exact_scores", lambda *a: calls.append(a[2].shape) or exact_scores(*a))
    _, indices = inner_product_topk(queries, refs.reshape(60, -1), 1)
    assert indices.flatten().tolist() == [0, 20, 30, 50] and calls == [(4, 4)]


def test_rows_are_ranked_in_bfloat16_or_float32_only():
    """The bound knows the rounding of those two; float16 would round more coarsely than float32's unit says."""
    with pytest.raises(ValueError, match="bfloat16 or float32, not torch.float16"):
        RankedRows(image_rows(4, (16, 16), seed=5), None, torch.float16)


def test_images_mostly_outside_their_low_frequencies_are_ranked_whole():
    """White-noise images would leave most of each product to the bound: they are ranked by all their values."""
    assert ranking_bases(image_rows(20, (64, 64), seed=4, smoothing=0)) is None
    assert ranking_bases(image_rows(20, (64, 64), seed=4)) is not None


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_indexes_find_the_exact_nearest_neighbours(kind, rng):
    refs = rng.standard_normal((600, 32)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    queries = torch.from_numpy(refs[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32))
    index = FaissIndex(kind, nprobe=8)
    index.add(refs)
    _, approx = index.search(queries, 1)
    _, exact = inner_product_topk(queries, refs, 1)
    recall = float((approx[:, 0] == exact[:, 0]).float().mean())
    assert recall == 1.0 if kind == "flat" else recall >= 0.9


def test_scorer_with_faiss_search_matches_exact_search():
    train = list(smooth_field(40, (32, 32), seed=5))
    bank = rc.ReferenceBank.build(train, [rc.VoxelLevel(grid=32)], progress=False)
    samples = torch.stack([train[4] + 0.1 * torch.randn(1, 32, 32), train[9].flip(2)])
    exact = rc.ReplicaScorer(bank, alpha=0.05).score(samples)
    flat = rc.ReplicaScorer(bank, alpha=0.05, search="flat").score(samples)
    assert [r.levels["voxel"].nearest_id for r in flat.records] == ["4", "9"]
    assert np.allclose(exact.similarities("voxel"), flat.similarities("voxel"), atol=1e-3)
