"""Each level's similarity equals its textbook definition on random data."""

import numpy as np
import pytest
import torch
from scipy import ndimage

import relict_callbacks as rc
from relict_callbacks.items import Item

from conftest import on_threads, smooth_field


def _bank(images, level, labels=None):
    labels = labels if labels is not None else [None] * len(images)
    return rc.ReferenceBank.build([{"image": im, "label": lb} for im, lb in zip(images, labels)], [level],
                                  progress=False)


@pytest.mark.parametrize("shape,channels,sigma", [((24, 20), 1, 0), ((12, 10, 8), 1, 0), ((16, 16), 3, 0),
                                                   ((24, 20), 1, 1.0), ((12, 10, 8), 1, 1.5)])
def test_voxel_similarity_is_pearson_correlation_of_the_smoothed_images(shape, channels, sigma):
    refs = smooth_field(12, shape, seed=1, channels=channels)
    queries = smooth_field(5, shape, seed=2, channels=channels)
    level = rc.VoxelLevel(grid=shape, max_shift=0, flips=(), smoothing=sigma, max_bend=0)
    bank = _bank(list(refs), level)
    found = bank.nearest(level, level.embed([Item(q, None, str(i)) for i, q in enumerate(queries)]))
    if sigma:  # the textbook Gaussian filter, edges replicated
        blur = lambda x: torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, *[sigma] * len(shape)),
                                                                  mode="nearest", truncate=3))
        refs, queries = torch.stack([blur(r) for r in refs]), torch.stack([blur(q) for q in queries])

    def ncc(a, b):  # per-channel z-scoring, then the mean product: Pearson r for one channel
        a, b = a.flatten(1).double(), b.flatten(1).double()
        if len(a) == 1:
            return np.corrcoef(a[0].numpy(), b[0].numpy())[0, 1]
        za = (a - a.mean(1, keepdim=True)) / a.std(1, unbiased=False, keepdim=True)
        zb = (b - b.mean(1, keepdim=True)) / b.std(1, unbiased=False, keepdim=True)
        return float((za * zb).mean())

    for i, q in enumerate(queries):
        expected = np.array([ncc(q, r) for r in refs])
        assert found.index[i] == expected.argmax()
        assert found.similarity[i] == pytest.approx(expected.max(), abs=2e-3)


def test_voxel_ncc_with_mask_only_counts_masked_voxels():
    refs = smooth_field(6, (16, 16), seed=3)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 2:14] = True
    level = rc.VoxelLevel(grid=16, mask=mask, max_shift=0, flips=(), smoothing=0, max_bend=0)
    bank = _bank(list(refs), level)
    query = smooth_field(1, (16, 16), seed=4)[0]
    found = bank.nearest(level, level.embed([Item(query, None, "q")]))
    expected = [np.corrcoef(query[0][mask].numpy(), r[0][mask].numpy())[0, 1] for r in refs]
    assert found.similarity[0] == pytest.approx(max(expected), abs=2e-3)
    with pytest.raises(ValueError, match="mask has no voxel inside"):
        rc.VoxelLevel(grid=16, mask=np.zeros((16, 16), bool))


@pytest.mark.parametrize("shape,axis", [((32, 28), 0), ((32, 28), 1), ((20, 18, 16), 0), ((20, 18, 16), 2)])
def test_mirrored_shifted_match_inside_a_mask_scores_the_correlation_of_its_moved_image(shape, axis):
    """The refinement mirrors the training image rather than the sample: the NCC it reports, inside a mask that is
    not symmetric, is the Pearson correlation of the sample with its training image moved by the reported transform
    (:func:`undo_match`), computed directly from the stored rows, over the mask as it lies on the mirrored sample
    (the mask stays with the training image's frame: mirrored into the sample's)."""
    from relict_callbacks.levels.voxel import undo_match

    refs = smooth_field(6, shape, seed=6)
    mask = np.zeros(shape, bool)
    mask[(slice(1, shape[0] - 4),) + tuple(slice(3, n - 1) for n in shape[1:])] = True
    level = rc.VoxelLevel(grid=shape, mask=mask, max_shift=2, smoothing=0, max_bend=0)
    bank = _bank(list(refs), level)
    moved_by_one = np.pad(refs[4].numpy(), [(0, 0)] + [(1, 1)] * len(shape), mode="edge")[(slice(None),) + tuple(
        slice(0, n) for n in shape)]  # sample[x] = training image[x - 1], edges replicated
    sample = torch.from_numpy(moved_by_one).flip(1 + axis)
    query = level.embed([Item(sample + 0.05 * smooth_field(1, shape, seed=7)[0], None, "q")])
    found = bank.nearest(level, query)
    assert found.index[0] == 4 and found.transform[0].startswith(f"flip{axis}+shift(")
    moved = undo_match(level.stored_image(bank.arrays["voxel"], 4), found.transform[0])
    inside = np.flip(mask, axis)
    expected = np.corrcoef(query["rows"][0, 0][inside].astype(np.float64), moved[0].numpy()[inside])[0, 1]
    assert found.similarity[0] == pytest.approx(expected, abs=1e-5)


def test_dice_equals_direct_computation(rng):
    masks = torch.from_numpy(rng.random((10, 1, 12, 12, 6)) < 0.3).to(torch.uint8)
    queries = torch.from_numpy(rng.random((4, 1, 12, 12, 6)) < 0.3).to(torch.uint8)
    level = rc.SegmentationLevel(grid=(12, 12, 6), flips=(), max_shift=0)  # plain Dice: no mirror/shift search
    images = torch.rand(10, 1, 12, 12, 6)
    bank = _bank(list(images), level, list(masks))
    found = bank.nearest(level, level.embed([Item(torch.rand(1, 12, 12, 6), q, str(i)) for i, q in enumerate(queries)]))
    for i, q in enumerate(queries):
        a = q.bool().numpy()
        dice = [2 * (a & m.bool().numpy()).sum() / (a.sum() + m.bool().numpy().sum()) for m in masks]
        assert found.index[i] == int(np.argmax(dice))
        assert found.similarity[i] == pytest.approx(max(dice), abs=1e-6)


def test_multi_label_dice_is_mean_over_labels_and_empty_labels_are_documented():
    level = rc.SegmentationLevel(labels=[1, 2], grid=(4, 4))
    ref = torch.zeros(1, 4, 4)
    ref[0, 0, :2] = 1  # label 1: 2 voxels; label 2 absent
    same_label1 = ref.clone()
    other = torch.zeros(1, 4, 4)
    other[0, 2, 2] = 1
    bank = _bank([torch.rand(1, 4, 4), torch.rand(1, 4, 4)], level, [ref, other])
    query = lambda lab: level.embed([Item(torch.rand(1, 4, 4), lab, "q")])
    # label 2 empty on both sides: left out of the mean -> Dice of label 1 alone
    assert bank.nearest(level, query(same_label1)).similarity[0] == pytest.approx(1.0)
    # label 2 present only in the sample: scores 0 for that label -> mean (1 + 0) / 2
    with_label2 = same_label1.clone()
    with_label2[0, 3, 3] = 2
    assert bank.nearest(level, query(with_label2)).similarity[0] == pytest.approx(0.5)
    # nothing segmented in either image: 0, never evidence of copying
    empty_bank = _bank([torch.rand(1, 4, 4)] * 2, level, [torch.zeros(1, 4, 4)] * 2)
    assert empty_bank.nearest(level, query(torch.zeros(1, 4, 4))).similarity[0] == 0.0


def test_segmentation_uses_segmenter_for_items_without_labels():
    segmenter = lambda images: (images > 0.5).float()
    level = rc.SegmentationLevel(segmenter=segmenter, grid=8)
    images = torch.rand(5, 1, 8, 8)
    bank = _bank(list(images), level)
    found = bank.nearest(level, level.embed([Item(images[2], None, "q")]))
    assert found.index[0] == 2 and found.similarity[0] == pytest.approx(1.0)


@pytest.mark.parametrize("shape, channels", [((20, 18, 16), 1), ((24, 20), 2)])
def test_an_embedding_made_a_few_images_at_a_time_is_the_batch_embedding(shape, channels, monkeypatch):
    """On the CPU the voxel level embeds a batch a few images at a time (``PIECE_BYTES`` of float32 each, so that the
    allocator reuses their temporaries): its rows, thumbnails and centroids are those of the whole batch at once, to
    the last bit."""
    import relict_callbacks.search as search

    items = [Item(image, None, str(i)) for i, image in enumerate(smooth_field(9, shape, seed=21, channels=channels))]
    level = rc.VoxelLevel(grid=shape)
    whole = level.embed(items)
    monkeypatch.setattr(search, "PIECE_BYTES", 3 * 4 * channels * int(np.prod(shape)))  # pieces of 3 images
    pieces = level.embed(items)
    assert search.row_pieces(9, 4 * channels * int(np.prod(shape))) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    for key in whole:
        assert np.array_equal(whole[key], pieces[key]), key


def test_feature_similarity_is_cosine_of_embeddings():
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    level = rc.FeatureLevel(extractor)
    refs = torch.rand(9, 1, 8, 8)
    bank = _bank(list(refs), level)
    query = torch.rand(1, 8, 8)
    found = bank.nearest(level, level.embed([Item(query, None, "q")]))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(extractor(query[None]), extractor(refs))
    assert found.index[0] == int(cosine.argmax())
    assert found.similarity[0] == pytest.approx(float(cosine.max()), abs=1e-5)
    assert extractor.training, "the extractor's training mode is restored"


def test_voxel_search_is_the_same_batched_one_by_one_and_on_tensor_rows():
    """The flip/shift refinement runs over all queries at once: each query's match does not depend on the
    others in its batch, and bank rows held as (float16) tensors score as numpy rows do."""
    from relict_callbacks.data import make_phantoms, make_replica

    train = make_phantoms(8, "head_ct", ndim=2, size=32, seed=70)
    level = rc.VoxelLevel(grid=32)
    bank = rc.ReferenceBank.build(train, [level], progress=False)
    samples = [make_replica(train[i], kind, seed=i) for i, kind in enumerate(["flip", "shift", "grain+flip", "none"])]
    query = level.embed([Item(torch.from_numpy(s["image"]), None, s["id"]) for s in samples])
    together = bank.nearest(level, query)
    alone = [bank.nearest(level, {k: v[i:i + 1] for k, v in query.items()}) for i in range(len(samples))]
    assert together.index.tolist() == [a.index[0] for a in alone] == [0, 1, 2, 3]
    assert together.transform == [a.transform[0] for a in alone]
    assert together.similarity == pytest.approx([a.similarity[0] for a in alone], abs=1e-5)
    on_tensors = level.nearest({k: torch.from_numpy(v).float() for k, v in query.items()},
                               {k: torch.from_numpy(v) for k, v in bank.arrays["voxel"].items()})
    assert on_tensors.transform == together.transform
    assert on_tensors.similarity == pytest.approx(together.similarity, abs=1e-5)


@pytest.mark.parametrize("shape, channels", [((29, 31), 1), ((30, 34), 2), ((20, 24, 28), 1), ((17, 19, 23), 2)])
def test_centroids_are_the_same_alone_in_a_batch_and_on_any_thread_count(shape, channels):
    """A row's centroid (from which the refinement predicts shifts, and thumbnails are centred) does not depend on
    the rows it is computed with nor on the CPU's thread count, so a row embedded alone stores the centroid a
    batch gives. Matrix products with ones rounded its last digit differently for a batch of one image, and on
    1 and 2 threads."""
    from relict_callbacks.levels.voxel import _centroids

    x = torch.randn(12, channels, *shape, generator=torch.Generator().manual_seed(6)).half().float() + 0.3

    def batched_and_alone():
        batched = _centroids(x)
        for rows in ([0], [11], [2, 3], list(range(1, 12, 3))):
            assert torch.equal(_centroids(x[rows]), batched[rows])
        return batched

    assert torch.equal(*on_threads(batched_and_alone))


@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
def test_query_forms_made_in_pieces_are_those_made_at_once(masked, monkeypatch):
    """The search's float32 query forms (standardized, masked, over the voxel count) of float16 rows are made a few
    queries at a time, so that the allocator reuses their memory: the same as all at once, bit for bit, on 1, 2 and
    4 threads."""
    from relict_callbacks import search

    grid = (64, 64, 64)
    mask = torch.ones(grid, dtype=torch.bool)
    mask[:, :8] = False
    level = rc.VoxelLevel(grid=64, mask=mask.numpy() if masked else None)
    rows = (torch.randn(9, 1, *grid, generator=torch.Generator().manual_seed(3)) + 0.2).half()
    assert len(search.row_pieces(len(rows), 4 * rows[0].numel())) > 1
    pieces = on_threads(lambda: level._query_form(rows, level._mask(grid)), (1, 2, 4))
    monkeypatch.setattr(search, "PIECE_BYTES", 2**40)
    whole = on_threads(lambda: level._query_form(rows, level._mask(grid)), (1, 2, 4))
    assert pieces[0].dtype == torch.float32 and all(torch.equal(a, b) for a, b in zip(pieces, whole))


def test_refined_ncc_of_a_3d_phantom_is_its_float64_ncc_on_any_thread_count():
    """A 64³ head phantom moved 1.5 voxels: its refined NCC is the float64 NCC of the stored images at the shift it
    reports, and the same on 1 and 2 threads. One float32 run over its 262,144 values (a constant background adds
    the same product thousands of times) was off by 1.2e-4 and changed with the thread count, and so did the
    shift it chose (a review's crafted case)."""
    from scipy import ndimage

    from relict_callbacks.data import make_phantoms
    from relict_callbacks.levels.voxel import _displace

    train = make_phantoms(4, "head_ct", ndim=3, size=64, seed=5)
    level = rc.VoxelLevel(grid=64, max_bend=0, flips=())
    bank = rc.ReferenceBank.build(train, [level], progress=False)
    image = ndimage.shift(train[0]["image"], (0, 0, 0, 1.4987658), order=1, mode="nearest")
    query = level.embed([Item(torch.from_numpy(image), None, "moved")])
    found = on_threads(lambda: bank.nearest(level, query))
    assert found[0].transform == found[1].transform == ["shift(0,0,1)"]
    assert found[0].similarity[0] == found[1].similarity[0]
    reference = torch.from_numpy(bank.arrays["voxel"]["rows"][:1]).double()
    window = _displace(reference, -torch.tensor([[[0, 0, 1]]]))[0, 0]
    z = [(x - x.mean()) / x.std(unbiased=False) for x in (window, torch.from_numpy(query["rows"][0]).double())]
    assert found[0].similarity[0] == pytest.approx(float((z[0] * z[1]).mean()), abs=1e-5)


def test_banks_saved_without_centroids_score_as_banks_with_them(tmp_path):
    """The refinement reads the centroids embedding stored (those of the stored rows); a bank saved before they
    were kept has none, and the refinement takes them from its rows: the same matches, bit for bit."""
    from relict_callbacks.data import make_phantoms, make_replica
    from relict_callbacks.levels.voxel import _centroids

    train = make_phantoms(10, "head_ct", ndim=3, size=24, seed=71)
    level = rc.VoxelLevel(grid=24, max_bend=0)
    bank = rc.ReferenceBank.build(train, [level], progress=False)
    rows = bank.arrays["voxel"]
    assert torch.equal(torch.from_numpy(rows["centroids"]), _centroids(torch.from_numpy(rows["rows"]).float()))
    samples = [make_replica(train[i], kind, seed=i) for i, kind in enumerate(["flip", "shift", "grain+flip", "none"])]
    query = level.embed([Item(torch.from_numpy(s["image"]), None, s["id"]) for s in samples])
    stored = bank.nearest(level, query)
    assert stored.index.tolist() == [0, 1, 2, 3] and stored.transform[0].startswith("flip")
    del rows["centroids"]
    path = bank.save(tmp_path / "old.npz")
    assert "rows.voxel.centroids" not in rc.ReferenceBank.read_manifest(path)["checksums"]
    old = rc.ReferenceBank.load(path)
    taken = old.nearest(old.levels[0], {k: v for k, v in query.items() if k != "centroids"})
    assert taken.index.tolist() == stored.index.tolist() and taken.transform == stored.transform
    assert np.array_equal(taken.similarity, stored.similarity)


@pytest.mark.parametrize("shape", [(7, 6), (5, 6, 7)])
def test_windows_read_mirrored_what_flipping_the_displaced_copy_gives(shape):
    """The refinement's windows of each shifted image are mirrored along the axes asked for: the same as displacing
    it and then flipping the copy, on every axis, shifts beyond the edge included; and a plain displacement reads
    each voxel at its shifted index clamped to the grid (edges replicated)."""
    from relict_callbacks.levels.voxel import _displace, _padded, _windows

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, *shape, generator=gen)
    shifts = torch.randint(-8, 9, (5, 3, len(shape)), generator=gen)
    mirror = torch.rand(5, len(shape), generator=gen) < 0.5
    mirror[0], mirror[1] = False, True
    plain, mirrored = _displace(x, shifts), _windows(_padded(x, 8, mirror), 8, shifts, mirror)
    for b in range(5):
        axes = [2 + a for a in range(len(shape)) if mirror[b, a]]
        assert torch.equal(mirrored[b], plain[b].flip(axes) if axes else plain[b])
    unshifted, everywhere = torch.zeros_like(shifts[:, :1]), torch.ones_like(mirror)
    assert torch.equal(_windows(_padded(x, 0, everywhere), 0, unshifted, everywhere)[:, 0],
                       x.flip(list(range(2, 2 + len(shape)))))
    for b in range(5):
        for s in range(3):
            indices = [(torch.arange(n) + int(shift)).clamp(0, n - 1) for n, shift in zip(shape, shifts[b, s])]
            assert torch.equal(plain[b, s], x[b][(slice(None), *torch.meshgrid(*indices, indexing="ij"))])


@pytest.mark.parametrize("shape, channels", [((40, 36), 1), ((30, 34), 2), ((12, 10, 14), 1), ((9, 11, 8), 2)])
def test_windows_summed_where_they_lie_score_as_the_windows_read(shape, channels):
    """The CPU refinement's NCC of each window summed where it lies in its training image (:func:`window_sums`)
    equals the NCC of the window read from a padded copy, within 1e-6: for every mirror, shifts past the edges, pairs
    sharing a query and images read by index; and it is the same to the last bit on 1 or 2 threads."""
    from relict_callbacks.levels.voxel import VoxelLevel, _padded, _standardize
    from relict_callbacks.window_sums import window_sums

    gen = torch.Generator().manual_seed(4)
    forms = _standardize(torch.randn(3, channels, *shape, generator=gen), None)
    images = torch.randn(6, channels, *shape, generator=gen) + 0.5
    shifts = torch.randint(-5, 6, (6, 4, len(shape)), generator=gen)
    mirror = torch.rand(6, len(shape), generator=gen) < 0.5
    mirror[0], mirror[1] = False, True
    padded = _padded(images, 5, mirror)
    for args in [(shifts, mirror), (shifts[:3], mirror[[4, 1, 2]], torch.tensor([4, 1, 2]))]:
        read = VoxelLevel._ncc(forms, padded, 5, *args[:2], None, *args[2:])
        summed = VoxelLevel._ncc_summed(forms, images, 5, *args[:2], None, *args[2:])
        torch.testing.assert_close(summed, read, atol=1e-6, rtol=0)
    threads = torch.get_num_threads()
    sums = []
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            sums.append(window_sums(forms, images, torch.arange(6) // 2, torch.arange(6), shifts, mirror))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(sums[0], sums[1])


@pytest.mark.parametrize("shape", [(32, 28), (20, 18, 16)])
def test_a_search_summing_windows_in_place_finds_what_reading_them_finds(shape, monkeypatch):
    """A whole voxel search on the CPU (windows summed where they lie) matches the same training images with the same
    mirrors and shifts as the search reading its windows from padded copies (the path of GPUs and masks), its
    similarities within 1e-6: mirrored and shifted copies and unrelated samples alike."""
    from relict_callbacks.levels.voxel import VoxelLevel

    refs = smooth_field(12, shape, seed=11)
    copies = [torch.roll(refs[i].flip(1 + i % len(shape)), shifts=1 - i % 3, dims=1 + (i + 1) % len(shape))
              for i in range(4)]
    samples = torch.stack(copies + list(smooth_field(4, shape, seed=12)))
    level = rc.VoxelLevel(grid=shape, max_shift=3)
    bank = _bank(list(refs), level)
    query = level.embed([Item(s, None, str(i)) for i, s in enumerate(samples)])
    summed = bank.nearest(level, query)
    calls = []
    monkeypatch.setattr(VoxelLevel, "_sums_in_place", staticmethod(lambda q, mask: calls.append(q.shape) or False))
    read = bank.nearest(level, query)
    assert calls  # the refinement asked, and read its windows
    assert list(summed.index) == list(read.index) and list(summed.transform) == list(read.transform)
    assert list(summed.index[:4]) == [0, 1, 2, 3] and all(t.startswith("flip") for t in summed.transform[:4])
    np.testing.assert_allclose(summed.similarity, read.similarity, atol=1e-6, rtol=0)


def _sums_of_ones():
    from relict_callbacks.window_sums import window_sums

    ones, pairs = torch.ones(4, 1, 3, 4, 5), torch.arange(4)
    return window_sums(ones, ones, pairs, pairs, torch.zeros(4, 2, 3, dtype=torch.long),
                       torch.zeros(4, 3, dtype=torch.bool))[..., 0].sum().item()


def test_window_sums_run_in_a_process_forked_after_they_ran():
    """A process that summed windows can fork a child that sums them too (numba's OpenMP layer
    terminated such a child: DataLoader workers, multiprocessing pools)."""
    import multiprocessing

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _sums_of_ones() == 4 * 2 * 60
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply_async(_sums_of_ones).get(timeout=120) == 4 * 2 * 60
    finally:
        torch.set_num_threads(threads)


def test_window_sums_import_and_run_where_numba_cannot_cache():
    """Where numba finds no writable place for its cache (a read-only install and home, here a cache locator that
    never applies), the kernel is compiled in the process instead: the package imports and sums (numba refused to
    decorate it, so importing relict_callbacks failed)."""
    import os
    import subprocess
    import sys

    code = ("import relict_callbacks, torch; from relict_callbacks.window_sums import window_sums; "
            "print(window_sums(torch.ones(1, 1, 1, 1, 4), torch.arange(4.0).view(1, 1, 1, 1, 4), torch.tensor([0]), "
            "torch.tensor([0]), torch.tensor([[[0, 0, 1]]]), torch.zeros(1, 3, dtype=torch.bool))[0, 0, 0].tolist())")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[9.0, 9.0, 23.0]"


@pytest.mark.parametrize("shape, channels, factor", [((40, 36), 1, 4), ((30, 34), 2, 4), ((64, 64, 64), 1, 4),
                                                      ((17, 19, 23), 2, 4), ((16, 16), 1, 1)])
def test_thumbnails_are_the_pooled_copies_centred_on_their_centroids(shape, channels, factor):
    """Each thumbnail is its image moved by whole voxels so that its centroid is mid-grid (edges replicated), then
    average-pooled: as displacing and pooling a copy give it, within float32 rounding, for blobs far off-centre
    (shifts of a quarter of the grid or more), several channels, sizes the factor does not divide and no pooling at all."""
    from relict_callbacks.levels.voxel import _centred_thumbnails, _centroids, _displace, _pool

    gen = torch.Generator().manual_seed(8)
    x, side = 0.01 * torch.rand(4, channels, *shape, generator=gen), min(shape) // 4
    for b in range(4):  # a bright blob near a corner, a different one in each image
        x[(b, slice(None), *[slice(1 + b, 1 + b + side)] * len(shape))] += 1 + torch.rand(side, generator=gen)
    middle = torch.tensor([(n - 1) / 2 for n in shape])
    shifts = (_centroids(x) - middle).round().long()
    assert shifts.abs().max() >= side
    expected = _pool(_displace(x, shifts[:, None])[:, 0], factor)
    assert torch.allclose(_centred_thumbnails(x, factor), expected, rtol=0, atol=1e-6)


def test_each_image_is_mirrored_along_the_axes_of_its_orientation_into_a_float32_copy():
    """The bend search's queries as matched: each mirrored as its orientation says, the images given untouched."""
    from relict_callbacks.levels.voxel import _mirrored, mirror_orientations

    orientations = mirror_orientations([0, 1, 2]) + [(0, 2)]
    x = torch.randn(7, 2, 4, 5, 6)
    flips = torch.tensor([0, 1, 2, 3, 4, 3, 1])
    given = x.clone()
    out = _mirrored(x, orientations, flips)
    assert torch.equal(x, given) and out.dtype == torch.float32
    for b, f in enumerate(flips.tolist()):
        assert torch.equal(out[b], x[b].flip([1 + a for a in orientations[f]]) if orientations[f] else x[b])
    assert torch.equal(_mirrored(x.half(), orientations, flips), _mirrored(x.half().float(), orientations, flips))


def test_undo_match_puts_the_training_image_onto_its_mirrored_shifted_copy():
    from relict_callbacks.levels.voxel import undo_match

    refs = smooth_field(6, (32, 32, 16), seed=5)
    level = rc.VoxelLevel(grid=(32, 32, 16), max_shift=3, smoothing=0)
    bank = _bank(list(refs), level)
    moved = torch.roll(refs[3].flip(3), shifts=(2, -1), dims=(1, 2))  # mirrored along axis 2, then moved
    found = bank.nearest(level, level.embed([Item(moved, None, "q")]))
    assert found.index[0] == 3 and found.transform[0].startswith("flip2+shift(")
    aligned = undo_match(refs[3], found.transform[0])
    inner = (slice(None), slice(3, -3), slice(3, -3))  # away from the edges the roll wrapped around
    assert torch.allclose(aligned[inner], moved[inner], atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 8)])
def test_a_bend_samples_as_monai_warp_does_with_its_field(shape):
    """A bend samples where MONAI ``Warp`` does with the bend's field (volumes: within the float32 rounding of a tall
    image's rows, a few 1e-5 voxels on these grids), edges replicated, whatever the displacement; no bend leaves an
    image as it is."""
    from monai.networks.blocks import Warp

    from relict_callbacks.levels.voxel import BEND_CONTROL, _bent, bend_field

    gen = torch.Generator().manual_seed(0)
    image = torch.randn(3, 2, *shape, generator=gen)
    controls = 3 * torch.randn(3, len(shape), *(BEND_CONTROL,) * len(shape), generator=gen)  # voxels, some past edges
    expected = Warp(mode="bilinear", padding_mode="border")(image, bend_field(controls, shape))
    torch.testing.assert_close(_bent(image, controls), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(_bent(image, torch.zeros_like(controls)), image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_bent_volume_is_read_where_its_field_points_even_past_a_slice_edge(axis):
    """A volume bent on a 64³ grid (its slices stacked into a tall image, :func:`_sample_volume`) takes each voxel's
    value from where the bend's field points, edges replicated, within 1e-3 voxels: a ramp along ``axis`` comes back
    as the displaced, clamped coordinate. Points pushed past a slice's first or last row read that row, not the
    neighbouring slice's: with the edge rows not repeated, the ramp along the rows came back up to 0.015 voxels off."""
    from relict_callbacks.levels.voxel import BEND_CONTROL, _bent, bend_field

    n = 64
    shape = [n if a == axis else 1 for a in range(3)]
    ramp = torch.arange(n, dtype=torch.float32).view(shape).expand(n, n, n)
    controls = 2.5 * torch.randn(1, 3, *(BEND_CONTROL,) * 3, generator=torch.Generator().manual_seed(3))
    field = bend_field(controls, (n, n, n))
    warped = _bent(ramp[None, None].contiguous(), controls)[0, 0]
    expected = (torch.arange(n, dtype=torch.float32).view(shape) + field[0, axis]).clamp(0, n - 1)
    for past in (field[0, 1] + torch.arange(n).view(1, n, 1) > n - 1, field[0, 1] + torch.arange(n).view(1, n, 1) < 0):
        assert past.any()  # some points past a slice's last row, some before its first
    torch.testing.assert_close(warped, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape, channels", [((30, 26), 1), ((21, 17), 2), ((12, 10, 14), 1), ((9, 11, 8), 2)])
def test_bent_windows_summed_where_they_lie_score_as_the_bent_copies(shape, channels, monkeypatch):
    """The CPU bend score summed where each bent window lies (:func:`bent_window_sums`) equals the NCC of the bent copy
    (the training image displaced, bent by :func:`_bent`, against the query mirrored: the path of GPUs and masks),
    within 1e-6: every mirror, shifts and bends past the edges, several channels."""
    from relict_callbacks.levels.voxel import BEND_CONTROL, VoxelLevel, mirror_orientations

    gen = torch.Generator().manual_seed(6)
    ndim = len(shape)
    queries = torch.randn(8, channels, *shape, generator=gen)
    refs = 0.7 * queries + torch.randn(8, channels, *shape, generator=gen) + 0.3
    controls = 3 * torch.randn(8, ndim, *(BEND_CONTROL,) * ndim, generator=gen)  # voxels, some past the edges
    moved = torch.randint(-4, 5, (8, ndim), generator=gen)
    orientations = mirror_orientations(range(ndim))
    flips = torch.arange(8) % len(orientations)
    summed = VoxelLevel._bent_ncc(queries, refs, controls, moved, orientations, flips, None)
    monkeypatch.setattr(VoxelLevel, "_sums_in_place", staticmethod(lambda q, mask: False))
    copied = VoxelLevel._bent_ncc(queries, refs, controls, moved, orientations, flips, None)
    torch.testing.assert_close(summed, copied, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, factor", [((16, 12), 4), ((13, 9, 10), 2), ((6, 5, 7), 1)])
def test_a_pair_pools_straight_from_its_images_as_from_their_moved_copies(shape, factor):
    """The bend search pools each query mirrored and each match displaced (edges replicated) in one matrix product per
    axis (:func:`_moved_pooled`), as pooling the mirrored and displaced copies does, the remainder of an axis
    that ``factor`` does not divide left out as ``avg_pool`` leaves it."""
    from relict_callbacks.levels.voxel import _displace, _moved_pooled, _pool

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 2, *shape, generator=gen)
    shifts = torch.randint(-3, 4, (5, len(shape)), generator=gen)
    mirror = torch.rand(5, len(shape), generator=gen) < 0.5
    pooled = _moved_pooled(x, factor, shifts, mirror)
    copies = torch.stack([_displace(x[b : b + 1], shifts[b].view(1, 1, -1))[0, 0].flip(
        [1 + a for a in range(len(shape)) if mirror[b, a]]) for b in range(5)])  # displaced, then mirrored
    expected = copies if factor == 1 else _pool(copies, factor)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", [(64, 48), (13, 7, 9)])
def test_bend_field_interpolates_its_control_points_as_torch_does(grid):
    from relict_callbacks.levels.voxel import BEND_CONTROL, bend_field

    controls = torch.randn(2, len(grid), *(BEND_CONTROL,) * len(grid), generator=torch.Generator().manual_seed(2))
    mode = "bilinear" if len(grid) == 2 else "trilinear"
    expected = torch.nn.functional.interpolate(controls, size=grid, mode=mode, align_corners=True)
    torch.testing.assert_close(bend_field(controls, grid), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [(16, 16), (16, 12, 16)])
def test_bend_energy_from_control_points_is_monai_bending_energy(grid):
    """The bend search's regularizer, a quadratic form of the control points, equals MONAI's BendingEnergyLoss of
    the interpolated field (what the search used to compute on the field at every step)."""
    from monai.losses import BendingEnergyLoss

    from relict_callbacks.levels.voxel import BEND_CONTROL, _bending_form, bend_field

    controls = torch.randn(4, len(grid), *(BEND_CONTROL,) * len(grid), generator=torch.Generator().manual_seed(1))
    flat = controls.flatten(2)
    quadratic = torch.einsum("bcp,pq,bcq->b", flat, _bending_form(grid), flat)
    expected = BendingEnergyLoss(reduction="none")(bend_field(controls, grid)).flatten(1).sum(1)
    torch.testing.assert_close(quadratic, expected, rtol=1e-4, atol=1e-6)


def _bend_objective(sample, reference, mask, controls):
    """What the bend search maximizes: NCC of the bent reference with the sample less the bending energy."""
    from relict_callbacks.levels.voxel import _bending_form, _bent, _energy_scale, _ncc_pairs

    grid = tuple(sample.shape[2:])
    flat = controls.flatten(2)
    energy = torch.einsum("bcp,pq,bcq->b", flat, _bending_form(grid), flat) / _energy_scale(grid)
    return _ncc_pairs(_bent(reference, controls), sample, mask) - energy


@pytest.mark.parametrize("ndim,size", [(2, 64), (3, 32)])
def test_gauss_newton_bend_scores_copies_as_adam_did_and_never_below_no_bend(ndim, size):
    """Bent and turned copies of phantoms, each bend fitted on the pooled pair as the search does: the Gauss-Newton fit
    scores every copy at full resolution within 1e-3 of the Adam fit it replaces, and well above no bend; for
    copies, unrelated pairs, two channels and a mask alike, its controls stay within reach and no pair ends with a
    worse objective than no bend at all (it keeps each pair's best step)."""
    from relict_callbacks.data import make_phantoms, make_replica
    from relict_callbacks.levels.voxel import BEND, _bent, _ncc_pairs, _pool, register

    phantoms = make_phantoms(6, kind="head_ct", ndim=ndim, size=size, seed=3)
    copies = [make_replica(p, ["bend", "rotate"][i % 2], seed=i) for i, p in enumerate(phantoms)]
    level = rc.VoxelLevel(grid=size)
    rows = [torch.from_numpy(level.embed([Item(torch.from_numpy(p["image"]), None, "x") for p in group])["rows"])
            .float() for group in (phantoms, copies)]
    factor = size // 16
    pooled = [_pool(r, factor) for r in rows]
    reach = BEND * size / factor
    bent = {fit: _ncc_pairs(_bent(rows[0], factor * register(pooled[1], pooled[0], None, reach, fit)), rows[1], None)
            for fit in ("gauss-newton", "adam")}
    straight = _ncc_pairs(rows[0], rows[1], None)
    assert (bent["gauss-newton"] > bent["adam"] - 1e-3).all(), (bent, straight)
    assert (bent["gauss-newton"] > straight + 0.5 * (1 - straight)).all(), (bent, straight)

    mask = torch.zeros(1, 1, *(16,) * ndim)
    mask[(..., *[slice(2, 14)] * ndim)] = 1
    two_channels = [torch.cat([p, p.square()], 1) for p in pooled]
    for sample, reference, where in [(pooled[1], pooled[0], None), (pooled[1], pooled[0].roll(1, 0), None),
                                     (two_channels[1], two_channels[0].roll(1, 0), None), (pooled[1], pooled[0], mask)]:
        controls = register(sample, reference, where, reach)
        assert controls.abs().max() <= reach + 1e-6
        assert (_bend_objective(sample, reference, where, controls)
                >= _bend_objective(sample, reference, where, torch.zeros_like(controls)) - 1e-6).all()


def test_banks_built_before_the_gauss_newton_bend_fit_keep_their_adam_fit(tmp_path, caplog):
    """A bank whose voxel level predates ``bend_fit`` loads with the Adam fit its nulls were computed with, also when
    its levels must be passed (a mask) or when it is a cached bank (reused for ``bend_fit="adam"``, rebuilt for the
    Gauss-Newton fit, saying why); a new level fits by Gauss-Newton and says so in its config; an unknown fit is
    refused by name."""
    import logging

    from relict_callbacks.bank import CACHE_NAME

    images = list(smooth_field(4, (24, 24), seed=0))
    mask = np.ones((24, 24), bool)
    mask[:2] = False
    for level, old_level in [(rc.VoxelLevel(grid=24), rc.VoxelLevel(grid=24, bend_fit="adam")),
                             (rc.VoxelLevel(grid=24, mask=mask), rc.VoxelLevel(grid=24, mask=mask, bend_fit="adam"))]:
        bank = rc.ReferenceBank.build(images, [level], cache_dir=tmp_path / "cache", progress=False)
        assert bank.manifest["levels"][0]["bend_fit"] == "gauss-newton"
        old = {key: value for key, value in bank.manifest["levels"][0].items() if key != "bend_fit"}
        bank.manifest["levels"] = [old]
        bank.save(tmp_path / "cache" / CACHE_NAME)  # as a version before bend_fit cached it
        loaded = rc.ReferenceBank.load(tmp_path / "cache" / CACHE_NAME, levels=[old_level])
        assert loaded.levels[0].bend_fit == "adam"
        with pytest.raises(rc.bank.BankError, match="do not match"):
            rc.ReferenceBank.load(tmp_path / "cache" / CACHE_NAME, levels=[level])
        with caplog.at_level(logging.WARNING, logger="relict_callbacks"):
            caplog.clear()
            rc.ReferenceBank.build(images, [old_level], cache_dir=tmp_path / "cache", progress=False)
            assert not caplog.records  # reused
            rc.ReferenceBank.build(images, [level], cache_dir=tmp_path / "cache", progress=False)
            assert "bend_fit 'adam' -> 'gauss-newton'" in caplog.text
    bank.manifest["levels"] = [{key: value for key, value in rc.VoxelLevel(grid=24).config().items()
                                if key != "bend_fit"}]
    assert rc.ReferenceBank.load(bank.save(tmp_path / "old.npz")).levels[0].bend_fit == "adam"
    assert rc.VoxelLevel.from_config(rc.VoxelLevel().config()).bend_fit == "gauss-newton"
    with pytest.raises(ValueError, match="bend_fit"):
        rc.VoxelLevel(bend_fit="lbfgs")


def test_gauss_newton_bend_is_the_same_whatever_the_thread_count():
    """The 3D fit's 192 x 192 systems solved on 1 or 2 threads give the same bends to the last bit (their float32
    Cholesky factors did not)."""
    from relict_callbacks.levels.voxel import register

    images = smooth_field(16, (16, 16, 16), seed=8)
    bends = on_threads(lambda: register(images[:8], images[8:], None, 0.5))
    assert torch.equal(*bends) and bends[0].abs().max() > 0.1


@pytest.mark.parametrize("fit", ["gauss-newton", "adam"])
def test_a_bend_is_the_same_fitted_alone_or_among_more_pairs_than_are_fitted_at_once(fit):
    """Pairs are fitted ``FIT_PAIRS`` at a time; each pair's bend does not depend on the others or on where the
    chunks split them."""
    from relict_callbacks.levels.voxel import FIT_PAIRS, register

    n = FIT_PAIRS + 3
    images = smooth_field(2 * n, (12, 12, 12), seed=5)
    together = register(images[:n], images[n:], None, 0.5, fit)
    alone = torch.cat([register(images[i : i + 1], images[n + i : n + i + 1], None, 0.5, fit) for i in (0, n - 1)])
    assert together.shape == (n, 3, 4, 4, 4) and together.abs().max() > 0.1
    torch.testing.assert_close(together[[0, n - 1]], alone, rtol=0, atol=1e-6)
