"""The main job: `relict demo` runs end to end from the console script and leaves its report."""

import json
import shutil
import subprocess
import sys
from pathlib import Path


def test_relict_demo_catches_the_planted_copies(tmp_path):
    relict = shutil.which("relict") or str(Path(sys.executable).with_name("relict"))
    out = tmp_path / "demo"
    result = subprocess.run([relict, "demo", "--planted", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "replica rate" in result.stdout and "planted copies" in result.stdout
    for kind in ("noise", "shift", "intensity", "blur", "flip"):
        assert f"{kind:<10} 4/4 flagged with the right source" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["records"]) == 36 and report["null_source"] == "holdout"
    assert (out / "results.csv").exists() and (out / "cache" / "bank.npz").exists()
    again = subprocess.run([relict, "demo", "--planted", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                           timeout=300)
    assert "reused cached bank" in again.stdout


def test_relict_demo_training_runs_end_to_end(tmp_path):
    """A short run of the main job (2 epochs): the Lightning DDPM demo leaves its history with bounds, reports,
    galleries and checkpoints, certifies the candidate with fresh samples and prints its wall and stage times."""
    relict = shutil.which("relict") or str(Path(sys.executable).with_name("relict"))
    out = tmp_path / "demo"
    result = subprocess.run([relict, "demo", "--out", str(out), "--epochs", "2", "--every", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bounds (low-high)" in result.stdout and "checkpoint to ship (certified <= 0.1" in result.stdout
    assert "8 samples per check can never certify a replica rate <= 0.1" in result.stderr  # said once, at the start
    history = json.loads((out / "history.json").read_text())
    assert [entry["epoch"] for entry in history if entry["kind"] == "check"] == [0, 1]
    assert all(0 <= e["relict/replica_rate_low"] <= e["relict/replica_rate"] <= e["relict/replica_rate_high"]
               for e in history)
    assert (out / "gallery-epoch=1.png").exists() and (out / "report-epoch=1.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt",
                                                                             "last.ckpt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] in ("NOT_STOPPED", "RATE_ABOVE_LIMIT")
    assert set(summary["stage_seconds"]) == {"bank build", "training", "checks (sampling, scoring, galleries)",
                                             "certification"}
    assert f"wall time {summary['seconds']:.0f} s: bank build" in result.stdout
    certified = summary["certified"]  # the latest clean checkpoints, newest first, each scored with 48 fresh samples
    assert [e["samples"] for e in history if e["kind"] == "certify"] == [48] * len(certified)
    for path in certified:
        assert f"certified {Path(path).name} with 48 fresh samples" in result.stdout
