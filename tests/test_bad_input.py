"""Every bad input gets a clear error naming the item and the problem."""

import numpy as np
import pytest
import torch

import relict_callbacks as rc
from relict_callbacks import BankError, ItemError

from conftest import smooth_field


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
