"""Segmentation level aligned to the match: masks compared under the voxel level's mirror/shift, or under the
level's own small search without a voxel level; the transform reaches CSV, HTML and gallery captions."""

import csv

import numpy as np
import torch
from image_files import write_png
from scipy import ndimage

import relict_callbacks as rc
from relict_callbacks.cli import main
from relict_callbacks.data import make_phantoms, make_replica
from relict_callbacks.levels.voxel import undo_match
from relict_callbacks.gallery import gallery_rows, ranked_records


def _moved(item: dict, axis: int, shift: tuple[int, ...]) -> dict:
    """``item`` mirrored along spatial ``axis`` and shifted by whole voxels (image and label alike)."""
    move = lambda a: ndimage.shift(np.flip(a, 1 + axis), (0, *shift), order=0, mode="nearest")  # noqa: E731
    return {"image": move(item["image"]), "label": move(item["label"]), "id": f"{item['id']}~moved"}


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_mirrored_copies_are_compared_under_the_voxel_match():
    train = make_phantoms(16, "head_ct", ndim=2, size=48, seed=90)
    bank = rc.ReferenceBank.build(train, [rc.VoxelLevel(grid=48, flips="all"), rc.SegmentationLevel(grid=48)],
                                  progress=False)
    # lesions far from their mirror image along the axis each copy is mirrored along
    sources = [min(train[:8], key=lambda item: _dice(np.flip(item["label"], 2), item["label"])),
               min(train[8:], key=lambda item: _dice(np.flip(item["label"], 1), item["label"]))]
    copies = [make_replica(sources[0], "flip"), _moved(sources[1], 0, (2, -1))]
    report = rc.ReplicaScorer(bank, alpha=0.2).score(copies)
    for copy, source, record in zip(copies, sources, report.records):
        voxel, segmentation = record.levels["voxel"], record.levels["segmentation"]
        assert segmentation.nearest_id == voxel.nearest_id == source["id"]
        assert segmentation.transform == voxel.transform and voxel.transform.startswith("flip")
        assert _dice(copy["label"], source["label"]) < 0.5  # compared unmirrored, as the level used to
        assert segmentation.similarity > 0.9, f"{copy['id']}: Dice {segmentation.similarity:.3f} under {voxel.transform}"
        assert segmentation.is_replica and record.is_replica
    rows = gallery_rows(report, lambda r: torch.from_numpy(copies[r.index]["image"]),
                        lambda m: torch.from_numpy(train[m.nearest_index]["image"]), bank.levels[0], 2)
    assert [row.record for row in rows] == ranked_records(report, 2)
    assert all(f"[{row.record.levels['voxel'].transform}]" in row.caption and "Dice" in row.caption for row in rows)


def test_without_a_voxel_level_the_level_searches_mirror_and_shift_itself():
    rng = np.random.default_rng(5)
    grid = np.mgrid[:32, :32]
    masks = []
    for _ in range(10):  # an off-centre ellipse and a small blob per image
        (cy, cx), (ry, rx) = rng.uniform(9, 23, 2), rng.uniform(3, 6, 2)
        blob = ((grid[0] - cy) / ry) ** 2 + ((grid[1] - cx) / rx) ** 2 < 1
        blob |= ((grid[0] - rng.uniform(6, 26)) ** 2 + (grid[1] - rng.uniform(6, 26)) ** 2) < 4
        masks.append(torch.from_numpy(blob[None]).to(torch.uint8))
    items = [{"image": torch.rand(1, 32, 32), "label": m, "id": f"m{i}"} for i, m in enumerate(masks)]
    query = _moved({"image": items[4]["image"].numpy(), "label": masks[4].numpy(), "id": "q"}, 0, (1, -2))
    found = {}
    for name, level in {"searched": rc.SegmentationLevel(grid=32),
                        "plain": rc.SegmentationLevel(grid=32, flips=(), max_shift=0)}.items():
        bank = rc.ReferenceBank.build(items, [level], progress=False)
        found[name] = rc.ReplicaScorer(bank, alpha=0.2).score([query]).records[0].levels["segmentation"]
    searched = found["searched"]
    assert searched.nearest_id == "m4" and searched.similarity == 1.0 and searched.transform.startswith("flip0+shift")
    moved = undo_match(masks[4].float(), searched.transform)
    assert torch.equal(moved.bool(), torch.from_numpy(query["label"]).bool())  # the transform says what matched
    assert found["plain"].similarity < 0.6


def test_own_search_walks_the_bank_in_chunks_of_bounded_bytes(monkeypatch):
    """The Dice search holds at most DEVICE_CHUNK_BYTES of float32 masks at once (2.1 GB a chunk of 256 at 128³
    before): one mask a chunk finds what the whole bank at once finds."""
    import relict_callbacks.levels.segmentation as segmentation

    items = [{"image": torch.rand(1, 32, 32), "label": (torch.rand(1, 32, 32) > 0.7).to(torch.uint8), "id": f"m{i}"}
             for i in range(6)]
    query = {"image": items[2]["image"].flip(2), "label": items[2]["label"].flip(2), "id": "q"}
    bank = rc.ReferenceBank.build(items, [rc.SegmentationLevel(grid=32)], progress=False)
    whole = rc.ReplicaScorer(bank, alpha=0.2).score([query]).records[0].levels["segmentation"]
    monkeypatch.setattr(segmentation, "DEVICE_CHUNK_BYTES", 4 * 32 * 32)  # one mask a chunk
    chunked = rc.ReplicaScorer(bank, alpha=0.2).score([query]).records[0].levels["segmentation"]
    assert (chunked.nearest_id, chunked.similarity, chunked.transform) == (whole.nearest_id, whole.similarity,
                                                                           whole.transform)
    assert whole.nearest_id == "m2" and whole.similarity == 1.0


def test_own_search_finds_small_mirrored_and_shifted_lesions_in_3d():
    train = make_phantoms(8, "head_ct", ndim=3, size=32, seed=5)
    bank = rc.ReferenceBank.build(train, [rc.SegmentationLevel(grid=32)], progress=False)
    copy = make_replica(make_replica(train[6], "flip"), "shift", seed=2)  # lesions of a few voxels, moved by 2
    match = rc.ReplicaScorer(bank, alpha=0.2).score([copy]).records[0].levels["segmentation"]
    assert match.nearest_id == train[6]["id"] and match.similarity > 0.9 and match.transform.startswith("flip0+shift")


def test_masks_are_aligned_when_the_voxel_grid_differs():
    train = make_phantoms(8, "head_ct", ndim=2, size=48, seed=91)
    bank = rc.ReferenceBank.build(train, [rc.VoxelLevel(grid=24), rc.SegmentationLevel(grid=48)], progress=False)
    copy = _moved(train[5], 1, (0, 2))  # 2 pixels = 1 voxel of the voxel level's grid
    record = rc.ReplicaScorer(bank, alpha=0.2).score([copy]).records[0]
    assert record.levels["voxel"].transform in ("flip1+shift(0,1)", "flip1+shift(0,-1)")
    assert record.levels["segmentation"].similarity > 0.85


def test_the_null_is_aligned_the_same_way_as_the_samples():
    train = make_phantoms(10, "head_ct", ndim=2, size=32, seed=92)
    holdout = make_phantoms(6, "head_ct", ndim=2, size=32, seed=93)
    bank = rc.ReferenceBank.build(train, [rc.VoxelLevel(grid=32), rc.SegmentationLevel(grid=32)], holdout=holdout,
                                  progress=False)
    report = rc.ReplicaScorer(bank, thresholds={"voxel": 1.0, "segmentation": 1.0}).score(holdout)
    for name in ("voxel", "segmentation"):
        np.testing.assert_allclose(report.similarities(name), bank.nulls[name], atol=1e-6)


def test_audit_shows_the_transform_of_each_level(tmp_path):
    train = make_phantoms(10, "head_ct", ndim=2, size=32, seed=94, id_prefix="case")
    synthetic = make_phantoms(2, "head_ct", ndim=2, size=32, seed=95, id_prefix="gen")
    synthetic.append(make_replica(train[6], "flip"))
    for folder, items in (("train", train), ("synthetic", synthetic)):
        for item in items:
            write_png(item["image"][0], tmp_path / folder / f"{item['id']}.png")
            write_png(item["label"][0].astype(float), tmp_path / f"{folder}_labels" / f"{item['id']}.png")
    out = tmp_path / "audit"
    argv = ["audit", "--train", tmp_path / "train", "--train-labels", tmp_path / "train_labels",
            "--synthetic", tmp_path / "synthetic", "--synthetic-labels", tmp_path / "synthetic_labels",
            "--alpha", "0.3", "--grid", "32", "--no-progress", "--out", out]
    assert main([str(a) for a in argv]) == 0
    rows = {r["id"]: r for r in csv.DictReader((out / "results.csv").open())}
    copy = rows["case-0006~flip.png"]
    assert copy["is_replica"] == "True" and copy["segmentation_nearest_id"] == "case-0006.png"
    assert copy["voxel_transform"].startswith("flip1") and copy["segmentation_transform"] == copy["voxel_transform"]
    assert float(copy["segmentation_similarity"]) > 0.9 and float(copy["p_value"]) <= 0.3
    page = (out / "report.html").read_text()
    assert f"under <code>{copy['voxel_transform']}</code>" in page and "p-value" in page


def _blobs(n: int, shape: tuple[int, ...], seed: int, labels: int = 1) -> torch.Tensor:
    """``n`` sets of ``labels`` random smooth blobs ``[n, labels, *shape]`` (uint8 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, labels, *[max(2, s // 4) for s in shape], generator=gen)
    x = torch.nn.functional.interpolate(x, size=shape, mode="trilinear" if len(shape) == 3 else "bilinear")
    return (x > 0.8).to(torch.uint8)


def test_own_search_scores_each_sample_as_it_would_alone(monkeypatch):
    """The own search is batched over samples and their candidates: each sample gets the same Dice, match and
    transform alone, among others and a sample at a time; moved copies are found whole, and their transform moves
    the training mask onto them."""
    import relict_callbacks.levels.segmentation as segmentation

    for shape in [(24, 20), (16, 12, 14)]:
        masks = torch.zeros(20, 2, *shape, dtype=torch.uint8)
        inner = (slice(None), slice(None), *[slice(3, n - 3) for n in shape])
        masks[inner] = _blobs(20, tuple(n - 6 for n in shape), seed=len(shape), labels=2)  # clear of the edges
        masks[5] = masks[3]  # equal masks
        masks[7] = 0  # an empty one
        moves = ["flip0+shift(" + ",".join(["1"] * len(shape)) + ")", "flip1",
                 "shift(" + ",".join(["-1"] + ["0"] * (len(shape) - 1)) + ")"]  # within reach (1 voxel here)
        copies = [undo_match(masks[i].float(), move)[None] for i, move in zip((2, 9, 14), moves)]
        queries = {"masks": torch.cat([*copies, _blobs(4, shape, seed=50, labels=2).float(), masks[3:4].float()])}
        bank = {"masks": masks.numpy(), "sizes": masks.flatten(2).sum(2).float().numpy()}
        level = rc.SegmentationLevel()
        together = level.nearest(queries, bank)
        monkeypatch.setattr(segmentation, "PAIR_BYTES", 1)  # a sample at a time
        for i in range(len(queries["masks"])):
            alone = level.nearest({"masks": queries["masks"][i : i + 1]}, bank)
            assert (alone.similarity[0], alone.index[0], alone.transform[0]) == (
                together.similarity[i], together.index[i], together.transform[i])
        monkeypatch.undo()
        assert together.index[:3].tolist() == [2, 9, 14] and (together.similarity[:3] == 1.0).all()
        for i, copy in enumerate(copies):
            assert torch.equal(undo_match(masks[together.index[i]].float(), together.transform[i]), copy[0])
        assert together.index[-1] in (3, 5) and together.transform[-1] == "identity" and together.similarity[-1] == 1


def test_dilation_is_max_pooling_and_centroids_are_those_of_the_voxels():
    from relict_callbacks.levels.segmentation import _centroids, _dilate

    for shape in [(24, 20), (16, 12, 14)]:
        masks = _blobs(6, shape, seed=7, labels=2)
        masks[2] = 0
        pool = torch.nn.functional.max_pool3d if len(shape) == 3 else torch.nn.functional.max_pool2d
        expected = pool(masks.float(), 5, stride=1, padding=2)
        assert torch.equal(_dilate(masks, 2).float(), expected)
        centres = _centroids(masks)
        for mask, centre in zip(masks, centres):
            points = torch.nonzero(mask.any(0)).float()
            middle = torch.tensor([(n - 1) / 2 for n in shape])
            assert torch.equal(centre, points.mean(0) if len(points) else middle)
