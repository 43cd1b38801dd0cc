"""`python -m rsae.paper` end to end on a tiny synthetic problem (the ReLU and Matryoshka teachers)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_paper_reproduction_runs_teacher_upgrade_and_report(tmp_path):
    cmd = [sys.executable, "-m", "rsae.paper", "--out", str(tmp_path), "--steps", "40", "--teachers", "relu,matryoshka",
           "--upgrade-overrides", "upgrade.calibration_tokens=2048", "upgrade.calibration_steps=10", "--",
           "data=synthetic", "data.d_in=16", "data.n_features=64", "data.batch_size=128", "trainer.val_check_interval=40"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    up = json.loads((tmp_path / "upgrades" / "relu" / "upgrade.json").read_text())
    assert up["settings"]["steps"] == 40  # fine-tuned as many steps as the teacher trained
    matryoshka = json.loads((tmp_path / "upgrades" / "matryoshka" / "upgrade.json").read_text())
    assert matryoshka["settings"]["gate"] == "jumprelu"  # upgraded as a BatchTopK teacher: its threshold
    assert matryoshka["rsae_init"]["mse"] == pytest.approx(matryoshka["teacher"]["mse"], rel=0.05)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "teacher" in table.lower() and "rsae" in table.lower()
    stamp = (tmp_path / "upgrades" / "relu" / "upgrade.json").stat().st_mtime_ns
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)  # resumes: nothing to redo
    assert (tmp_path / "upgrades" / "relu" / "upgrade.json").stat().st_mtime_ns == stamp
