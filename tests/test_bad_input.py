"""Every bad input gets a clear error naming the item and the problem."""

import csv
import json

import numpy as np
import pytest
import torch

import relict_callbacks as rc
from relict_callbacks import BankError, ItemError
from relict_callbacks.cli import main
from relict_callbacks.io import ImageReader
from relict_callbacks.items import check_image
from relict_callbacks.report import BadImage, write_csv

from conftest import run_relict, smooth_field


def _build(items, levels=None, **kwargs):
    return rc.ReferenceBank.build(items, levels or [rc.VoxelLevel(grid=16, max_shift=1)], progress=False, **kwargs)


@pytest.fixture
def bank():
    return _build(list(smooth_field(6, (16, 16), seed=0)))


def _good(n=3):
    return [{"image": im, "id": f"p{i}"} for i, im in enumerate(smooth_field(n, (16, 16), seed=1))]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_item(value):
    items = _good()
    items[1]["image"] = items[1]["image"].clone()
    items[1]["image"][0, 3, 3] = value
    with pytest.raises(ItemError, match=r"item 1 \(id 'p1'\): image contains 1 NaN/Inf"):
        _build(items)


def test_huge_finite_intensities_are_not_taken_for_nan():
    """The check sums the image in one pass; a sum that overflows is looked at voxel by voxel."""
    image = torch.full((1, 8, 8), 3e38)
    assert torch.equal(check_image(image, "item 0"), image)
    image[0, 2, 2] = float("nan")
    with pytest.raises(ItemError, match=r"item 0: image contains 1 NaN/Inf"):
        check_image(image, "item 0")


@pytest.mark.parametrize("shape", [(16, 16), (16,), (1, 2, 4, 4, 4, 4)])
def test_wrong_rank(shape):
    with pytest.raises(ItemError, match=r"item 0: image has shape .*expected \[C, \*spatial\]"):
        _build([torch.rand(*shape), torch.rand(*shape)])


def test_mismatched_channels_and_mixed_2d_3d():
    with pytest.raises(ItemError, match=r"item 1 .*3 channels|item 1.*same number of channels"):
        _build([torch.rand(1, 16, 16), torch.rand(3, 16, 16)])
    with pytest.raises(ItemError, match=r"item 1.*same number of channels and spatial dims"):
        _build([torch.rand(1, 16, 16), torch.rand(1, 16, 16, 16)])


def test_samples_must_match_the_bank(bank):
    with pytest.raises(ItemError, match=r"sample 0: image has shape \(2, 16, 16\), but the bank holds 2D images with 1"):
        rc.ReplicaScorer(bank, alpha=0.2).score(torch.rand(1, 2, 16, 16))
    with pytest.raises(ItemError, match=r"samples: a batch tensor must be \[N, C, \*spatial\]"):
        rc.ReplicaScorer(bank, alpha=0.2).score(torch.rand(16, 16))
    with pytest.raises(ItemError, match="no samples"):
        rc.ReplicaScorer(bank, alpha=0.2).score([])


def test_scorer_drops_samples_it_cannot_score_and_embeds_each_once():
    seen = []  # batch sizes the feature level's extractor was called with, bank build aside

    def extractor(images):
        seen.append(len(images))
        return images.flatten(1)[:, :8]

    bank = _build(list(smooth_field(6, (16, 16), seed=0)), [rc.FeatureLevel(extractor), rc.VoxelLevel(grid=16)])
    scorer = rc.ReplicaScorer(bank, alpha=0.2, batch_size=3)
    samples = smooth_field(7, (16, 16), seed=2)
    samples[1] = 0.5  # the voxel level cannot embed it (NCC undefined)
    samples[3, 0, 2, 2] = float("nan")  # refused before embedding
    with pytest.raises(ItemError, match=r"item '1': image is constant"):  # without on_error, bad input raises
        scorer.score(samples)
    with pytest.raises(ItemError, match=r"sample 1: image contains 1 NaN/Inf"):
        scorer.score(samples[2:4])
    bad, seen[:] = {}, []
    report = scorer.score(samples, on_error=bad.__setitem__)
    assert sorted(bad) == ["1", "3"] and "image is constant" in str(bad["1"]) and "NaN/Inf" in str(bad["3"])
    assert [r.id for r in report.records] == ["0", "2", "4", "5", "6"]
    assert seen == [3, 1, 1, 1, 3]  # batch [0 1 2] failed, so item by item; batch [4 5 6] embedded once
    alone = scorer.score(samples[[0, 2, 4, 5, 6]])
    for level in ("feature", "voxel"):
        assert np.allclose(report.similarities(level), alone.similarities(level), atol=1e-6)


def test_scorer_raises_what_is_wrong_only_with_items_together_even_with_on_error():
    images = smooth_field(8, (16, 16), seed=0)
    train = [{"image": image, "label": (image > 0).float(), "id": f"t{i}"} for i, image in enumerate(images[:6])]
    bank = _build(train, [rc.SegmentationLevel(grid=16)])
    pair = [{"image": images[6], "label": images[6] > 0},
            {"image": images[7], "label": torch.cat([images[7] > 0, images[7] > 0.1])}]  # 1 and 2 label channels
    bad = {}
    with pytest.raises(ItemError, match=r"item '1': 2 label channel\(s\), the first item has 1"):
        rc.ReplicaScorer(bank, alpha=0.3).score(pair, on_error=bad.__setitem__)
    assert bad == {}  # each item alone is fine: neither is dropped as bad


def test_results_csv_is_the_report_rows_plus_an_error_column(bank, tmp_path):
    report = rc.ReplicaScorer(bank, alpha=0.2).score(smooth_field(2, (16, 16), seed=1))
    report.to_csv(tmp_path / "plain.csv")
    write_csv(tmp_path / "results.csv", report, [BadImage("x.npy", "x.npy: cannot read image")])
    plain = list(csv.reader((tmp_path / "plain.csv").open()))
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert len(plain) == 3 and [row[:-1] for row in rows[:3]] == plain
    assert [row[-1] for row in rows[:3]] == ["error", "", ""]
    assert rows[3:] == [["", "x.npy"] + [""] * (len(plain[0]) - 2) + ["x.npy: cannot read image"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.csv", "results.csv"]  # no temporary file left


def test_empty_and_constant_images():
    with pytest.raises(ItemError, match=r"item 0: image is empty"):
        _build([torch.rand(1, 0, 16), torch.rand(1, 0, 16)])
    items = _good()
    items[2]["image"] = torch.full((1, 16, 16), 0.3)
    with pytest.raises(ItemError, match=r"item 'p2': image is constant"):
        _build(items)


def test_missing_label_for_segmentation_level():
    items = _good()
    items[0]["label"] = (items[0]["image"] > 0).float()
    items[1]["label"] = (items[1]["image"] > 0).float()
    with pytest.raises(ItemError, match=r"item 'p2': no label, and the segmentation level has no segmenter"):
        _build(items, [rc.SegmentationLevel(grid=16)])


def test_label_on_another_grid():
    items = _good()
    items[0]["label"] = torch.ones(1, 8, 8)
    with pytest.raises(ItemError, match=r"item 0 \(id 'p0'\): label has shape \(1, 8, 8\), image has shape \(1, 16, 16\)"):
        _build(items, [rc.SegmentationLevel(grid=16)])


def test_duplicate_ids_and_empty_training_set():
    items = _good()
    items[2]["id"] = "p0"
    with pytest.raises(ItemError, match=r"unique; repeated: \['p0'\]"):
        _build(items)
    with pytest.raises(ItemError, match="training set is empty"):
        _build([])


def test_corrupt_truncated_and_foreign_bank_files(bank, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a bank" * 10)
    with pytest.raises(BankError, match="garbage.npz: not a readable relict bank"):
        rc.ReferenceBank.load(garbage)

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(BankError, match=r"foreign.npz: not a relict bank \(no manifest"):
        rc.ReferenceBank.load(foreign)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, manifest=np.frombuffer(b"{}", dtype=np.uint8), ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BankError, match="pickled.npz"):
        rc.ReferenceBank.load(pickled)

    good = bank.save(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BankError, match="truncated.npz"):
        rc.ReferenceBank.load(truncated)

    with pytest.raises(BankError, match="do not match the saved"):
        rc.ReferenceBank.load(good, levels=[rc.VoxelLevel(grid=32)])
    with pytest.raises(BankError, match="no such bank file"):
        rc.ReferenceBank.load(tmp_path / "missing.npz")


def test_feature_level_bank_needs_its_extractor_to_load(tmp_path):
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8))
    path = _build(_good(), [rc.FeatureLevel(extractor)]).save(tmp_path / "bank.npz")
    with pytest.raises(ValueError, match=r"pass levels=\[..., FeatureLevel\(extractor=...\)\]"):
        rc.ReferenceBank.load(path)
    assert len(rc.ReferenceBank.load(path, levels=[rc.FeatureLevel(extractor)])) == 3


def test_extractor_returning_nan_names_the_item():
    extractor = lambda images: torch.full((len(images), 4), float("nan"))
    with pytest.raises(ItemError, match=r"item 'p0': the feature extractor returned NaN/Inf embedding"):
        _build(_good(), [rc.FeatureLevel(extractor)])


def test_scorer_configuration_errors(bank):
    with pytest.raises(ValueError, match=r"thresholds for unknown level\(s\) \['feature'\]"):
        rc.ReplicaScorer(bank, thresholds={"feature": 0.9})
    with pytest.raises(ValueError, match="rule must be one of"):
        rc.ReplicaScorer(bank, rule="most")


@pytest.fixture
def folders(tmp_path):
    """6 training images and 4 synthetic ones (the third a copy of a training image) as 16x16 ``.npy``."""
    images = smooth_field(10, (16, 16), seed=3)[:, 0].numpy()
    for name, part in (("train", images[:6]), ("synthetic", np.concatenate([images[6:8], images[2:3], images[8:9]]))):
        (tmp_path / name).mkdir()
        for i, image in enumerate(part):
            np.save(tmp_path / name / f"{name}-{i}.npy", image)
    return tmp_path


def _audit_args(folders, *extra):
    return ["audit", "--train", folders / "train", "--synthetic", folders / "synthetic", "--grid", "16",
            "--threshold", "voxel=0.95", "--no-progress", "--out", folders / "out", *extra]


def test_bad_synthetic_images_get_a_row_and_the_others_are_scored(folders):
    synthetic = folders / "synthetic"
    np.save(synthetic / "constant.npy", np.zeros((16, 16)))
    nan = np.ones((16, 16))
    nan[3, 3] = np.nan
    np.save(synthetic / "nan.npy", nan)
    (synthetic / "corrupt.npy").write_bytes(b"\x93NUMPY" + b"\x00" * 20)
    np.save(synthetic / "volume.npy", np.random.rand(8, 8, 8))  # 3D among 2D
    np.save(synthetic / "rgb.npy", np.random.rand(3, 16, 16))  # 3 channels, the bank has 1
    result = run_relict(*_audit_args(folders))
    assert result.returncode == 0, result.stderr
    assert "5 of 9 synthetic images could not be scored" in result.stderr
    rows = {row["id"]: row for row in csv.DictReader((folders / "out" / "results.csv").open())}
    errors = {name: rows[name]["error"] for name in rows if rows[name]["error"]}
    assert sorted(errors) == ["constant.npy", "corrupt.npy", "nan.npy", "rgb.npy", "volume.npy"]
    assert "image is constant" in errors["constant.npy"] and "1 NaN/Inf" in errors["nan.npy"]
    assert "cannot read image" in errors["corrupt.npy"] and "a 3D image" in errors["volume.npy"]
    assert "but the bank holds 2D images with 1 channel" in errors["rgb.npy"]
    assert all(rows[name]["is_replica"] == "" for name in errors)
    assert [name for name in rows if name in errors] == sorted(errors)  # in file order, after the scored ones
    assert rows["synthetic-2.npy"]["is_replica"] == "True" and rows["synthetic-0.npy"]["is_replica"] == "False"
    summary = json.loads((folders / "out" / "summary.json").read_text())
    assert summary["counts"] == {"synthetic": 4, "flagged": 1, "not_scored": 5}
    assert summary["replica_rate"] == 0.25 and "(5 more could not be scored)" in summary["headline"]
    assert {bad["id"] for bad in summary["not_scored"]} == set(errors)
    page = (folders / "out" / "report.html").read_text()
    assert "Not scored (5)" in page and "constant.npy" in page and "image is constant" in page

    result = run_relict(*_audit_args(folders, "--strict"))  # any bad image is fatal; the old report stays
    assert result.returncode == 2 and "constant.npy" in result.stderr and "--strict" in result.stderr
    assert "4 more bad synthetic image(s)" in result.stderr  # the first in file order is named, the others counted
    assert json.loads((folders / "out" / "summary.json").read_text()) == summary


def test_a_bad_training_image_stops_the_audit_saying_why(folders, capsys):
    np.save(folders / "train" / "constant.npy", np.zeros((16, 16)))
    assert main([str(a) for a in _audit_args(folders)]) == 2
    message = capsys.readouterr().err
    assert "'constant.npy': image is constant" in message
    assert "training and holdout images make the reference" in message and not (folders / "out").exists()


def test_no_scorable_synthetic_image_is_an_error(folders, capsys):
    for path in (folders / "synthetic").iterdir():
        np.save(path, np.zeros((16, 16)))
    assert main([str(a) for a in _audit_args(folders)]) == 2
    assert "none of the 4 synthetic images can be scored" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, problem", [
    ("--alpha", "nan", "must be a finite number, got nan"), ("--alpha", "1.5", "must be in (0, 1), got 1.5"),
    ("--confidence", "1", "must be in (0, 1), got 1.0"), ("--fail-above", "inf", "must be a finite number"),
    ("--fail-above", "-0.1", "must be in [0, 1]"), ("--grid", "0", "must be in [2, inf]"),
    ("--grid", "1.5", "expected a whole number"), ("--spacing", "-1", "must be in (0, inf]"),
    ("--gallery", "-1", "must be in [0, inf]"), ("--threshold", "voxel=inf", "--threshold voxel must be a finite"),
    ("--threshold", "voxel=1.5", "--threshold voxel must be in [-1, 1]"),
])
def test_numeric_options_refuse_nan_inf_and_out_of_range(folders, capsys, option, value, problem):
    with pytest.raises(SystemExit) as stop:
        code = main([str(a) for a in _audit_args(folders, option, value)])
        raise SystemExit(code)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and problem in message and option in message, message
    assert not (folders / "out").exists()


def test_threshold_nan_on_the_command_line(folders):
    result = run_relict(*_audit_args(folders, "--threshold", "voxel=nan"))
    assert result.returncode == 2
    assert "relict: error: --threshold voxel must be a finite number, got nan" in result.stderr
    assert not (folders / "out").exists()


@pytest.mark.parametrize("make, problem", [
    (lambda: rc.VoxelLevel(grid=0), "grid must be in [2, inf], got 0"),
    (lambda: rc.VoxelLevel(grid=(16, float("nan"))), "grid[1] must be a finite number, got nan"),
    (lambda: rc.VoxelLevel(max_shift=-1), "max_shift must be in [0, inf], got -1"),
    (lambda: rc.VoxelLevel(max_shift=float("inf")), "max_shift must be a finite number"),
    (lambda: rc.VoxelLevel(top_k=0), "top_k must be in [1, inf], got 0"),
    (lambda: rc.SegmentationLevel(grid=(8, 8, 8, 8)), "grid must be one size or 2 or 3 sizes"),
    (lambda: rc.SegmentationLevel(labels=[1.5]), "labels must be a whole number, got 1.5"),
    (lambda: rc.FeatureLevel(torch.nn.Flatten(), grid=-4), "grid must be in [2, inf], got -4"),
    (lambda: ImageReader(spacing=float("nan")), "spacing must be a finite number, got nan"),
    (lambda: ImageReader(spacing=0), "spacing must be in (0, inf], got 0"),
    (lambda: ImageReader(grid=1), "grid must be in [2, inf], got 1"),
    (lambda: _build(_good(), null_size=0), "null_size must be in [1, inf], got 0"),
    (lambda: _build(_good(), batch_size=float("nan")), "batch_size must be a finite number, got nan"),
])
def test_python_options_refuse_nan_inf_and_out_of_range(make, problem):
    with pytest.raises(ValueError) as error:
        make()
    assert problem in str(error.value)
