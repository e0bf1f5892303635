"""`relict audit` and `relict bank build` on real files: phantoms written as PNG, NIfTI and DICOM."""

import base64
import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from image_files import write_png
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import relict_callbacks as rc
from relict_callbacks.cli import main
from relict_callbacks.io import ImageFolder, ImageReader

from conftest import run_relict

def write_nifti(volume: np.ndarray, path: Path, spacing=1.0, origin=0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(volume, affine), path)


def write_dicom_series(volume: np.ndarray, folder: Path, spacing=1.0) -> None:
    """A RAS volume [X, Y, Z] in [0, 1] as a CT series, one axial slice per file, in LPS patient space."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nx, ny, nz = volume.shape
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.InstanceNumber = "CT", "phantom", "Phantom^Head", k + 1
        # RAS voxel (i, j, k) sits at LPS (-i, -j, k) * spacing; rows run posterior, columns to the patient's left
        ds.ImagePositionPatient = [-(nx - 1) * spacing, -(ny - 1) * spacing, k * spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], spacing
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ny, nx, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 0.001
        ds.PixelData = np.ascontiguousarray(np.round(volume[::-1, ::-1, k].T * 1000).astype(np.int16)).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)


COPIES = ("noise", "flip", "shift")


@pytest.fixture(scope="module")
def png_set(tmp_path_factory):
    """2D head CTs (32²) as PNG, with label PNGs: 12 training, 12 holdout, 6 fresh + 3 planted copies."""
    root = tmp_path_factory.mktemp("png")
    train = rc.data.make_phantoms(12, ndim=2, size=32, seed=0, id_prefix="case")
    sets = {"train": train, "holdout": rc.data.make_phantoms(12, ndim=2, size=32, seed=1, id_prefix="hold"),
            "synthetic": rc.data.make_phantoms(6, ndim=2, size=32, seed=2, id_prefix="gen")
            + [rc.data.make_replica(train[2 + 3 * i], kind) for i, kind in enumerate(COPIES)]}
    for name, items in sets.items():
        for item in items:
            write_png(item["image"][0], root / name / f"{item['id']}.png")
            write_png(item["label"][0].astype(float), root / f"{name}_labels" / f"{item['id']}.png")
    return root


def test_audit_png_folders_writes_the_report(png_set, tmp_path):
    out = tmp_path / "audit"
    result = run_relict("audit", "--train", png_set / "train", "--train-labels", png_set / "train_labels",
                  "--holdout", png_set / "holdout", "--holdout-labels", png_set / "holdout_labels",
                  "--synthetic", png_set / "synthetic", "--synthetic-labels", png_set / "synthetic_labels",
                  "--alpha", "0.1", "--grid", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "relict score" in result.stderr  # progress bars on stderr
    assert sorted(p.name for p in out.iterdir()) == [".relict-output", "report.html", "results.csv", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "flagged" and set(summary["counts"]) == {"synthetic", "flagged", "not_scored"}
    assert summary["counts"]["synthetic"] == 9 and summary["counts"]["not_scored"] == 0
    assert summary["inputs"]["levels"] == ["voxel", "segmentation"] and summary["null_source"] == "holdout"
    assert set(summary["thresholds"]) == {"voxel", "segmentation"} and set(summary["tests"]["voxel"]) == {"z", "p"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 9 and {"id", "is_replica", "voxel_similarity", "voxel_nearest_id",
                               "segmentation_similarity", "segmentation_nearest_id"} <= set(rows[0])
    copies = [r for r in rows if "~" in r["id"]]
    for row in copies:  # each planted copy is flagged, with its source as nearest training file
        assert row["is_replica"] == "True", row
        assert row["id"].startswith(row["voxel_nearest_id"].removesuffix(".png") + "~")
    assert summary["counts"]["flagged"] == sum(r["is_replica"] == "True" for r in rows) >= len(copies) == 3
    page = (out / "report.html").read_text()
    assert page.index(summary["headline"]) < page.index("Per level")  # verdict first
    images = [part.split("'")[0] for part in page.split("src='data:image/png;base64,")[1:]]
    assert len(images) == 2 and all(base64.b64decode(data)[:4] == b"\x89PNG" for data in images)
    assert "case-0002.png" in page and "Flagged samples" in page


@pytest.fixture(scope="module")
def volume_set(tmp_path_factory):
    """3D head CTs (24³): 8 training as NIfTI; synthetic: 3 fresh and a noisy copy as NIfTI, a mirrored copy
    as a DICOM series."""
    root = tmp_path_factory.mktemp("volumes")
    train = rc.data.make_phantoms(8, ndim=3, size=24, seed=0, id_prefix="case")
    for item in train:
        write_nifti(item["image"][0], root / "train" / f"{item['id']}.nii.gz")
    for item in rc.data.make_phantoms(3, ndim=3, size=24, seed=2, id_prefix="gen"):
        write_nifti(item["image"][0], root / "synthetic" / f"{item['id']}.nii.gz")
    write_nifti(rc.data.make_replica(train[1], "noise")["image"][0], root / "synthetic" / "copy_noise.nii")
    write_dicom_series(rc.data.make_replica(train[5], "flip")["image"][0], root / "synthetic" / "copy_flip")
    return root


def test_bank_build_then_audit_3d_fails_above_the_limit(volume_set, tmp_path, capsys):
    bank = tmp_path / "bank.npz"
    argv = ["bank", "build", "--train", volume_set / "train", "--grid", "24", "--no-progress", "--out", bank]
    assert main([str(a) for a in argv]) == 0
    assert bank.is_file() and "bank of 8 training images" in capsys.readouterr().out
    out = tmp_path / "audit"
    result = run_relict("audit", "--bank", bank, "--synthetic", volume_set / "synthetic", "--alpha", "0.2",
                  "--fail-above", "0.1", "--no-progress", "--out", out)
    assert result.returncode == 1, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "fail" and summary["headline"].startswith("FAIL")
    assert summary["inputs"]["bank_file"] == str(bank.resolve()) and summary["null_source"] == "leave-one-out"
    rows = {r["id"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == ["copy_flip", "copy_noise.nii", "gen-0000.nii.gz", "gen-0001.nii.gz", "gen-0002.nii.gz"]
    copies = ["copy_flip", "copy_noise.nii"]
    # the planted copies and none of the 3 unseen patients (the nearest, gen-0000 at NCC 0.9904, sits under the
    # threshold of 0.9920, the null maximum: 8 leave-one-out values cannot resolve alpha 0.2)
    assert sorted(name for name, row in rows.items() if row["is_replica"] == "True") == copies
    assert rows["copy_noise.nii"]["is_replica"] == "True" and rows["copy_noise.nii"]["voxel_nearest_id"] == "case-0001.nii.gz"
    assert rows["copy_flip"]["is_replica"] == "True" and rows["copy_flip"]["voxel_nearest_id"] == "case-0005.nii.gz"
    assert rows["copy_flip"]["voxel_transform"].startswith("flip0")  # the DICOM series was read in RAS
    assert "FAIL" in (out / "report.html").read_text()
    limit = len(copies) / len(rows)  # the copies' share: a run flagging anything more fails
    argv = ["audit", "--bank", bank, "--synthetic", volume_set / "synthetic", "--alpha", "0.2", "--fail-above", limit,
            "--hide-training-images", "--no-progress", "--out", out]
    assert main([str(a) for a in argv]) == 0  # within the limit; --out replaced as a whole
    rows = csv.DictReader((out / "results.csv").open())
    assert sorted(row["id"] for row in rows if row["is_replica"] == "True") == copies
    page = (out / "report.html").read_text()
    assert json.loads((out / "summary.json").read_text())["verdict"] == "pass" and "PASS" in page
    assert "training image hidden" not in page and "case-0005.nii.gz" in page  # ids stay; pictures are PNGs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".audit")]  # no temp folders left


def test_nifti_spacing_and_orientation_reach_the_same_physical_grid(tmp_path):
    """One head at 1 mm (24³), at 2 mm with a wider field of view (16³), stored LPS, and as DICOM: the same grid."""
    volume = rc.data.make_phantoms(1, ndim=3, size=24, seed=4)[0]["image"][0]
    write_nifti(volume, tmp_path / "a" / "fine.nii.gz")
    coarse = np.pad(volume.reshape(12, 2, 12, 2, 12, 2).mean((1, 3, 5)), 2, mode="edge")  # 32 mm at 2 mm
    write_nifti(coarse, tmp_path / "a" / "coarse.nii.gz", spacing=2.0, origin=0.5 - 4.0)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # the same voxels stored right-to-left, anterior-to-posterior
    lps[:2, 3] = 23
    nib.save(nib.Nifti1Image(volume[::-1, ::-1].copy(), lps), tmp_path / "a" / "lps.nii.gz")
    write_dicom_series(volume, tmp_path / "a" / "series")
    reader = ImageReader(grid=24, spacing=1.0)
    images = {item["id"]: item["image"] for item in ImageFolder(tmp_path / "a", reader)}
    assert all(tuple(im.shape) == (1, 24, 24, 24) for im in images.values())

    def ncc(a, b):
        a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
        return float((a * b).mean())

    fine = images["fine.nii.gz"]
    assert ncc(fine, images["lps.nii.gz"]) > 0.999 and ncc(fine, images["series"]) > 0.999
    assert ncc(fine, images["coarse.nii.gz"]) > 0.9  # half the resolution, same place and size
    stretched = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None, None], size=(24,) * 3,
                                                mode="trilinear")[0]
    assert ncc(fine, stretched) < ncc(fine, images["coarse.nii.gz"]) - 0.1  # ignoring spacing would not be


def _small_copy(png_set, root, n_synthetic=2):
    """4 training and ``n_synthetic`` synthetic PNGs (and training labels) copied under ``root``."""
    for name in ("train", "train_labels", "synthetic"):
        (root / name).mkdir(parents=True)
        for path in sorted((png_set / name).iterdir())[: 4 if name.startswith("train") else n_synthetic]:
            shutil.copy(path, root / name / path.name)
    return root


def _bad_copy(png_set, tmp_path, defect):
    """A small copy of the PNG set (4 training, 2 synthetic) with one defect; returns (argv, file to name)."""
    root = _small_copy(png_set, tmp_path / "in")
    argv = ["audit", "--train", root / "train", "--synthetic", root / "synthetic", "--alpha", "0.3",
            "--grid", "32", "--no-progress", "--strict", "--out", tmp_path / "out"]
    if defect == "unreadable":  # a file that cannot be opened at all
        named = root / "train" / "case-0099.png"
        os.symlink(root / "missing.png", named)
    elif defect == "unsupported":
        named = root / "train" / "notes.docx"
        named.write_bytes(b"PK\x03\x04")
    elif defect == "corrupt":
        named = root / "synthetic" / "gen-0099.png"
        named.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    elif defect == "mixed 2D/3D":
        named = root / "synthetic" / "volume.npy"
        np.save(named, np.random.rand(8, 8, 8))
    elif defect == "empty folder":
        named = root / "synthetic"
        shutil.rmtree(named)
        named.mkdir()
    elif defect == "label without image":
        named = root / "train_labels" / "case-0050.png"
        shutil.copy(root / "train_labels" / "case-0000.png", named)
        argv += ["--train-labels", root / "train_labels"]
    return [str(a) for a in argv], named


@pytest.mark.parametrize("defect", ["unreadable", "unsupported", "corrupt", "mixed 2D/3D", "empty folder",
                                    "label without image"])
def test_bad_input_exits_2_naming_the_file_and_writes_nothing(png_set, tmp_path, capsys, defect):
    argv, named = _bad_copy(png_set, tmp_path, defect)
    assert main(argv[:]) == 2
    message = capsys.readouterr().err
    assert message.startswith("relict: error: ") and str(named) in message, message
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_input_exit_status_and_old_report_kept(png_set, tmp_path):
    argv, named = _bad_copy(png_set, tmp_path, "corrupt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier report stays as it was
    (out / ".relict-output").write_text(json.dumps({"files": ["summary.json"]}))
    result = run_relict(*argv[argv.index("audit"):])
    assert result.returncode == 2 and str(named) in result.stderr and "cannot read image" in result.stderr
    assert "--strict" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".relict-output", "summary.json"]
    assert (out / "summary.json").read_text() == "{}"


def test_feature_level_and_option_errors_exit_2(png_set, tmp_path, capsys):
    base = ["audit", "--train", str(png_set / "train"), "--synthetic", str(png_set / "synthetic"),
            "--out", str(tmp_path / "out")]
    assert main(base + ["--levels", "voxel,feature"]) == 2
    assert "feature level needs a feature extractor" in capsys.readouterr().err
    assert main(base + ["--levels", "segmentation"]) == 2
    assert "needs --train-labels" in capsys.readouterr().err
    assert main(base + ["--threshold", "voxel=high"]) == 2
    assert "expected LEVEL=NUMBER" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["synthetic", "inside train", "holds labels"])
def test_out_on_an_input_is_refused_and_nothing_is_touched(png_set, tmp_path, where):
    inputs = _small_copy(png_set, tmp_path / "in")
    out = {"synthetic": inputs / "synthetic", "inside train": inputs / "train" / "audit",
           "holds labels": inputs}[where]
    before = _snapshot(tmp_path)
    result = run_relict("audit", "--train", inputs / "train", "--train-labels", inputs / "train_labels", "--synthetic",
                  inputs / "synthetic", "--grid", "32", "--no-progress", "--out", out)
    assert result.returncode == 2, result.stderr
    problem = {"synthetic": "is the --synthetic input", "inside train": "lies inside the --train input",
               "holds labels": "holds the --train input"}[where]
    assert f"--out {out}: {problem}" in result.stderr
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_bank_file_and_its_training_folder_are_inputs_too(png_set, tmp_path, capsys):
    inputs = _small_copy(png_set, tmp_path / "in")
    bank = tmp_path / "bank.npz"
    build = ["bank", "build", "--train", inputs / "train", "--grid", "32", "--no-progress", "--out"]
    assert main([str(a) for a in build + [inputs / "train" / "bank.npz"]]) == 2
    assert "lies inside the --train input" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    assert main([str(a) for a in build + [tmp_path / "notes.txt"]]) == 2  # only a bank is ever replaced
    assert "notes.txt: not a readable relict bank" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    np.savez(bank, manifest=np.frombuffer(json.dumps({"format": "relict-bank/1"}).encode(), np.uint8))
    assert main([str(a) for a in build + [bank]]) == 0  # a bank of an older version is replaced
    before = _snapshot(tmp_path)
    audit = ["audit", "--bank", bank, "--synthetic", inputs / "synthetic", "--no-progress", "--out"]
    assert main([str(a) for a in audit + [bank]]) == 2
    assert "is the --bank input" in capsys.readouterr().err
    assert main([str(a) for a in audit + [inputs / "train" / "report"]]) == 2  # the bank's saved training folder
    assert "lies inside the training folder of the bank input" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_out_replaces_only_what_relict_wrote(png_set, tmp_path, capsys):
    inputs = _small_copy(png_set, tmp_path / "in")
    out = tmp_path / "out"
    argv = [str(a) for a in ("audit", "--train", inputs / "train", "--synthetic", inputs / "synthetic", "--alpha",
                             "0.3", "--grid", "32", "--no-progress", "--out", out)]
    out.mkdir()
    (out / "thesis.tex").write_text("not relict's")
    assert main(argv) == 2  # a folder relict did not write
    assert "a non-empty folder that relict did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    (out / "thesis.tex").unlink()
    assert main(argv) == 0  # an empty folder is fine
    (out / "notes.txt").write_text("added after the audit")
    first = _snapshot(out)
    assert main(argv) == 2  # a report folder with something added is not replaced
    assert "holds files relict did not write (notes.txt)" in capsys.readouterr().err
    assert _snapshot(out) == first
    (out / "notes.txt").unlink()
    assert main(argv) == 0  # a report folder holding only what relict wrote is replaced
    assert sorted(p.name for p in out.iterdir()) == [".relict-output", "report.html", "results.csv", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary or old folders left



def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["audit", "--help"])
    page = " ".join(capsys.readouterr().out.split())  # as argparse wraps it
    assert stop.value.code == 0 and "exit status: 0 done" in page and "1 the replica rate is above --fail-above" in page
    assert "2 usage error or bad input" in page and "--strict" in page
