"""`python -m rsae.paper` end to end on a tiny synthetic problem (the ReLU and Matryoshka teachers)."""

import json
import subprocess
import sys
import tarfile

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
    subprocess.run([*cmd[:3], "--pack", str(tmp_path / "r.tar.gz"), *cmd[3:]], cwd=ROOT, capture_output=True, text=True, timeout=900,
                   check=True)  # resumes: nothing to redo
    assert (tmp_path / "upgrades" / "relu" / "upgrade.json").stat().st_mtime_ns == stamp

    # The pack moves the results without weights; a rerun elsewhere redoes only what is missing.
    with tarfile.open(tmp_path / "r.tar.gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "elsewhere", filter="data")
    assert "upgrades/relu/upgrade.json" in names and not any(n.endswith((".safetensors", ".ckpt")) for n in names)
    moved = tmp_path / "elsewhere"
    (moved / "upgrades" / "relu" / "metrics.json").unlink()  # this row is to redo; its teacher has no weights here
    again = [moved if part == str(tmp_path) else part for part in cmd]
    proc = subprocess.run(again, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (moved / "teachers" / "relu" / "sae" / "sae_weights.safetensors").is_file()  # trained again
    assert json.loads((moved / "upgrades" / "relu" / "metrics.json").read_text())["status"] == "ok"
    assert not (moved / "teachers" / "matryoshka" / "sae" / "sae_weights.safetensors").exists()  # its row was done


def _dry_run(*args: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-m", "rsae.paper", "--dry-run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    return [line.split()[2:] for line in proc.stdout.splitlines() if line.startswith("python train.py ")]


def test_presets_give_valid_configs(tmp_path):
    from hydra import compose, initialize_config_dir

    import rsae.config  # noqa: F401  (registers the config resolvers)
    from rsae.validate import check_config

    gpu = _dry_run("--preset", "gpu-scale", "--text", str(tmp_path / "corpus.parquet"), "--out", str(tmp_path))
    assert len(gpu) == 2 * 15  # five families at three sparsities, each a teacher and its upgrade
    cpu = _dry_run("--preset", "cpu-small", "--out", str(tmp_path))
    assert len(cpu) == 2 * 3 and "upgrade.downstream=false" in cpu[1]
    more = _dry_run("--preset", "cpu-small", "--teachers", "batchtopk,matryoshka,gated", "--out", str(tmp_path))
    assert [args[0] for args in more[::2]] == ["sae=batchtopk", "sae=matryoshka", "sae=gated"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for args in gpu + cpu + more:
            args = [a for a in args if not a.startswith("hydra.")]
            cfg = compose("train", overrides=args)  # every key the presets set exists
            check_config(cfg)  # and every value is in range
    from rsae.paper import ABLATIONS

    ablated = _dry_run("--preset", "gpu-scale", "--text", str(tmp_path / "c.parquet"), "--out", str(tmp_path),
                       "--teachers", "matryoshka_k32", "--ablations", ",".join(ABLATIONS))
    assert len(ablated) == 2 + len(ABLATIONS)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, args in zip(ABLATIONS, ablated[2:]):
            cfg = compose("train", overrides=[a for a in args if not a.startswith("hydra.")])
            check_config(cfg)  # every ablation's key exists and its value is in range
            assert name in args[-1] and cfg.upgrade.control == (name in ("finetune_x2", "control_batchtopk"))
    assert any("sae.l0_target=32" in args for args in gpu) and any("sae.k=64" in args for args in gpu)
    assert any("sae=matryoshka" in args and "sae.k=16" in args for args in gpu)


def test_gpu_preset_needs_text():
    proc = subprocess.run([sys.executable, "-m", "rsae.paper", "--preset", "gpu-scale", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs --text" in proc.stderr


def test_parallel_rows_run_at_once_and_all_finish(tmp_path):
    cmd = [sys.executable, "-m", "rsae.paper", "--out", str(tmp_path), "--steps", "20", "--teachers", "relu,topk",
           "--parallel", "2", "--upgrade-overrides", "upgrade.calibration_tokens=2048", "upgrade.calibration_steps=10",
           "--", "data=synthetic", "data.d_in=16", "data.n_features=64", "data.batch_size=128"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(line.count("python train.py") <= 1 for line in proc.stdout.splitlines())  # whole lines, not interleaved
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("$ python train.py", "  -> exit"))]
    assert sorted(line.split()[3] for line in lines[:2]) == ["sae=relu", "sae=topk"]  # both began before either ended
    for name in ("relu", "topk"):
        assert json.loads((tmp_path / "upgrades" / name / "metrics.json").read_text())["status"] == "ok"
    assert proc.stdout.count("  -> exit 0") == 4


def test_parallel_must_be_positive():
    proc = subprocess.run([sys.executable, "-m", "rsae.paper", "--parallel", "0", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--parallel must be at least 1" in proc.stderr


def test_ablations_upgrade_the_rows_teacher_and_are_tabulated(tmp_path):
    cmd = [sys.executable, "-m", "rsae.paper", "--out", str(tmp_path), "--steps", "20", "--teachers", "relu",
           "--parallel", "2", "--ablations", "gate_frozen,degrees_3_2,finetune_x2",
           "--upgrade-overrides", "upgrade.calibration_tokens=2048", "upgrade.calibration_steps=10",
           "--", "data=synthetic", "data.d_in=16", "data.n_features=64", "data.batch_size=128"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("sae=relu ") == 1  # one teacher for the row and its ablations
    ablations = tmp_path / "ablations" / "relu"
    frozen = json.loads((ablations / "gate_frozen" / "upgrade.json").read_text())
    assert frozen["settings"]["gate_lr_scale"] == 0 and "teacher_ft" not in frozen  # the row's control is the reference
    assert json.loads((ablations / "degrees_3_2" / "upgrade.json").read_text())["settings"]["degrees"] == [3, 2]
    longer = json.loads((ablations / "finetune_x2" / "upgrade.json").read_text())
    assert longer["settings"]["steps"] == 40 and "teacher_ft" in longer  # its control fine-tunes as long
    row = json.loads((tmp_path / "upgrades" / "relu" / "upgrade.json").read_text())
    table = (tmp_path / "report" / "ablations.md").read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "`upgrade.gate_lr_scale=0`" in lines["gate_frozen: RSAE"]
    rsae, mse = row["rsae"]["mse"], frozen["rsae"]["mse"]
    assert f"{round(100 * (mse - rsae) / rsae, 1) + 0.0:+.1f}%" in lines["gate_frozen: RSAE"]  # MSE against the row's RSAE
    assert "finetune_x2: control" in lines and "`upgrade.steps=40`" in lines["finetune_x2: control"]

    stamp = (ablations / "gate_frozen" / "upgrade.json").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "python train.py" not in again.stdout  # all done: nothing reruns
    assert (ablations / "gate_frozen" / "upgrade.json").stat().st_mtime_ns == stamp


def test_unknown_ablation_is_refused():
    proc = subprocess.run([sys.executable, "-m", "rsae.paper", "--ablations", "gate_frozen,fastest", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ablation 'fastest'" in proc.stderr
