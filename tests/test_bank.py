"""ReferenceBank: item forms, save/load round trip (memory-mapped), cache reuse and rebuild by fingerprint."""

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import relict_callbacks as rc

from conftest import run_relict, smooth_field

LEVELS = lambda: [rc.VoxelLevel(grid=16, max_shift=1), rc.SegmentationLevel(grid=16)]


def _items(n=10, seed=0):
    images = smooth_field(n, (16, 16), seed=seed)
    return [{"image": im, "label": (im > 0).to(torch.uint8), "id": f"p{i:02d}"} for i, im in enumerate(images)]


def test_item_forms_give_the_same_bank():
    items = _items()
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["label"] for it in items])
    forms = {
        "dicts": items,
        "tuples": [(it["image"].numpy(), it["label"].numpy()) for it in items],
        "dataset": TensorDataset(images, labels),
        "dataloader": DataLoader(TensorDataset(images, labels), batch_size=3),
    }
    banks = {name: rc.ReferenceBank.build(form, LEVELS(), progress=False, batch_size=4) for name, form in forms.items()}
    reference = banks.pop("dicts")
    assert reference.ids[:2] == ["p00", "p01"]
    for name, bank in banks.items():
        assert bank.ids == [str(i) for i in range(10)], name
        for level, rows in reference.arrays.items():
            for key, array in rows.items():
                np.testing.assert_array_equal(bank.arrays[level][key], array, err_msg=f"{name} {level}.{key}")


def test_bank_handles_3d_and_multichannel_images():
    images = smooth_field(6, (8, 8, 8), seed=1, channels=2)
    bank = rc.ReferenceBank.build(list(images), [rc.VoxelLevel(grid=8, max_shift=1)], progress=False)
    assert bank.image_shape == (2, 3)
    assert bank.arrays["voxel"]["rows"].shape == (6, 2, 8, 8, 8)


def test_save_load_round_trip_is_memory_mapped_float16(tmp_path):
    bank = rc.ReferenceBank.build(_items(), LEVELS(), progress=False)
    bank.save(tmp_path / "bank.npz")
    loaded = rc.ReferenceBank.load(tmp_path / "bank.npz")
    rows = loaded.arrays["voxel"]["rows"]
    assert isinstance(rows, np.memmap) and rows.dtype == np.float16
    assert loaded.ids == bank.ids and loaded.fingerprint == bank.fingerprint
    for level, arrays in bank.arrays.items():
        for key, array in arrays.items():
            np.testing.assert_array_equal(loaded.arrays[level][key], array)
    np.testing.assert_array_equal(loaded.nulls["voxel"], bank.nulls["voxel"])
    sample = [_items(1, seed=9)[0]]
    before = rc.ReplicaScorer(bank, alpha=0.1).score(sample).to_dict()
    after = rc.ReplicaScorer(loaded, alpha=0.1).score(sample).to_dict()
    assert before == after


def test_cache_is_reused_while_the_fingerprint_matches_and_rebuilt_with_a_reason(tmp_path, caplog):
    items = _items()
    first = rc.ReferenceBank.build(items, LEVELS(), cache_dir=tmp_path, progress=False)
    assert (tmp_path / "bank.npz").exists() and "built" in first.cache_message
    again = rc.ReferenceBank.build(items, LEVELS(), cache_dir=tmp_path, progress=False)
    assert again.cache_message.startswith("reused") and again.fingerprint == first.fingerprint
    shuffled = rc.ReferenceBank.build(items[::-1], LEVELS(), cache_dir=tmp_path, progress=False)
    assert shuffled.cache_message.startswith("reused"), "the same items in another order are the same bank"

    changed = [dict(it) for it in items]
    changed[3]["image"] = changed[3]["image"] + 1.0
    with caplog.at_level(logging.WARNING, logger="relict_callbacks"):
        rebuilt = rc.ReferenceBank.build(changed, LEVELS(), cache_dir=tmp_path, progress=False)
    assert "training image or label content changed" in caplog.text
    assert rebuilt.fingerprint != first.fingerprint

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="relict_callbacks"):
        rc.ReferenceBank.build(changed[:-1], [rc.VoxelLevel(grid=16, max_shift=2), rc.SegmentationLevel(grid=16)],
                               cache_dir=tmp_path, progress=False)
    assert "level 'voxel' changed: max_shift 1 -> 2" in caplog.text
    assert "item ids changed: 0 added, 1 removed" in caplog.text


def test_holdout_gives_holdout_null_and_is_part_of_the_fingerprint(tmp_path):
    items, holdout = _items(10, seed=0), _items(6, seed=1)
    bank = rc.ReferenceBank.build(items, LEVELS(), holdout=holdout, cache_dir=tmp_path, progress=False)
    assert bank.null_source == "holdout" and len(bank.nulls["voxel"]) == 6
    loo = rc.ReferenceBank.build(items, LEVELS(), cache_dir=tmp_path, progress=False)
    assert loo.null_source == "leave-one-out" and "holdout set changed" in loo.cache_message


def test_leave_one_out_null_never_matches_an_item_with_itself():
    items = _items(12)
    bank = rc.ReferenceBank.build(items, [rc.VoxelLevel(grid=16, max_shift=0, flips=())], progress=False, null_size=5)
    assert len(bank.nulls["voxel"]) == 5
    assert bank.nulls["voxel"].max() < 0.99


def _flip_bit(path, member: str) -> None:
    """Flip one bit in the middle of the data of ``member`` of the ``.npz`` at ``path``."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member + ".npy")
    size = np.load(path)[member].nbytes  # the array's data ends its member
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - size + size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_array_is_checksummed_and_a_flipped_bit_is_named(tmp_path):
    bank = rc.ReferenceBank.build(_items(), LEVELS(), progress=False)
    path = bank.save(tmp_path / "bank.npz")
    manifest = rc.ReferenceBank.read_manifest(path)
    assert set(manifest["checksums"]) == {"ids", "rows.voxel.rows", "rows.voxel.thumbs", "rows.voxel.centroids",
                                          "rows.segmentation.masks", "rows.segmentation.sizes", "null.voxel",
                                          "null.segmentation"}
    for member in ("rows.voxel.rows", "null.segmentation"):  # (ids and manifest are read whole: zip CRC-32)
        broken = tmp_path / f"broken-{member}.npz"
        broken.write_bytes(path.read_bytes())
        _flip_bit(broken, member)
        with pytest.raises(rc.BankError, match=rf"broken-{member}.npz: array '{member}' does not match its checksum"):
            rc.ReferenceBank.load(broken)


def test_cache_with_a_flipped_bit_is_rebuilt_saying_why(tmp_path, caplog):
    items = _items()
    first = rc.ReferenceBank.build(items, LEVELS(), cache_dir=tmp_path, progress=False)
    _flip_bit(tmp_path / "bank.npz", "rows.voxel.rows")
    with caplog.at_level(logging.WARNING, logger="relict_callbacks"):
        rebuilt = rc.ReferenceBank.build(items, LEVELS(), cache_dir=tmp_path, progress=False)
    assert "array 'rows.voxel.rows' does not match its checksum" in caplog.text
    assert rebuilt.cache_message.startswith("built") and "does not match its checksum" in rebuilt.cache_message
    assert rebuilt.fingerprint == first.fingerprint
    assert rc.ReferenceBank.build(items, LEVELS(), cache_dir=tmp_path, progress=False).cache_message.startswith("reused")


def test_audit_with_a_flipped_bit_in_the_bank_exits_2_naming_the_array(tmp_path):
    for name, seed in (("train", 0), ("synthetic", 1)):
        (tmp_path / name).mkdir()
        for item in _items(4, seed=seed):
            np.save(tmp_path / name / f"{item['id']}.npy", item["image"][0].numpy())
    bank = tmp_path / "bank.npz"
    assert run_relict("bank", "build", "--train", tmp_path / "train", "--grid", "16", "--no-progress",
                      "--out", bank).returncode == 0
    _flip_bit(bank, "rows.voxel.rows")
    result = run_relict("audit", "--bank", bank, "--synthetic", tmp_path / "synthetic", "--no-progress",
                        "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"relict: error: {bank}: array 'rows.voxel.rows' does not match its checksum" in result.stderr
    assert not (tmp_path / "out").exists()
