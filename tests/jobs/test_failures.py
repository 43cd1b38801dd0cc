"""Nothing lost, nothing faked: a diverged run, a signal, a bad setting or a bad file ends the job
with one line, a non-zero exit code and a truthful (strict JSON) metrics.json."""

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_train
from rsae.io.saelens import save_sae
from rsae.report.collect import read_run
from rsae.sae import TopKSAE

COMMON = ("data=synthetic", "logger=csv", "data.batch_size=256")


def strict_json(path: Path) -> dict:
    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(Path(path).read_text(), parse_constant=reject)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# --- a diverged run ---------------------------------------------------------------------------
def test_nan_loss_fails_and_exports_nothing(tmp_path):
    proc = run_train("sae=topk", "trainer.max_steps=60", "trainer.val_check_interval=30", "module.lr=1e30",
                     f"hydra.run.dir={tmp_path}", *COMMON, check=False)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "training loss is not finite at step 1" in line and "mse=nan" in line, line
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["status"] == "failed" and "not finite" in metrics["error"]
    assert not (tmp_path / "sae").exists()  # no export, and no checkpoint of the diverged weights
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))
    assert read_run(tmp_path).status == "failed"


def test_nan_is_caught_at_the_first_logged_step(tmp_path):
    # Checked where the loss is read for logging anyway: every 5 steps here, long before the end.
    proc = run_train("sae=relu", "trainer.max_steps=400", "trainer.val_check_interval=400", "trainer.log_every_n_steps=5",
                     "module.lr=1e30", f"hydra.run.dir={tmp_path}", *COMMON, check=False)
    assert proc.returncode == 1
    assert "(loss terms at step 4:" in error_line(proc)


# --- signals ----------------------------------------------------------------------------------
def _spawn(*overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_checkpoint_and_resume_matches_uninterrupted_run(tmp_path, sig, code):
    args = ("sae=topk", "trainer.max_steps=600", "trainer.val_check_interval=50", *COMMON)
    run = tmp_path / "interrupted"
    proc = _spawn(*args, f"hydra.run.dir={run}")
    _wait_for(run / "checkpoints" / "last.ckpt", proc)  # step 50's periodic checkpoint: training is under way
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    metrics = strict_json(run / "metrics.json")
    assert metrics["status"] == "interrupted" and metrics["signal"] == sig.name
    assert 50 <= metrics["step"] < 600
    ckpt = Path(metrics["checkpoint"])
    assert ckpt == (run / "checkpoints" / "last.ckpt").resolve()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == metrics["step"]
    assert f"resume with: {metrics['resume']}" in err and "Traceback" not in err
    assert not (run / "sae").exists()
    assert read_run(run).status == "interrupted"

    # The recorded command resumes (here into another directory) and ends where an uninterrupted run ends.
    cmd = shlex.split(metrics["resume"])
    assert cmd[:2] == ["python", str(ROOT / "train.py")] and cmd[-1] == f"ckpt_path={ckpt}"
    resumed, full = tmp_path / "resumed", tmp_path / "full"
    run_train(*[a for a in cmd[2:] if not a.startswith("hydra.run.dir=")], f"hydra.run.dir={resumed}")
    run_train(*args, f"hydra.run.dir={full}")
    a = load_file(str(full / "sae" / "sae_weights.safetensors"))
    b = load_file(str(resumed / "sae" / "sae_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert strict_json(resumed / "metrics.json")["train/steps"] == 600


# --- settings checked before anything loads ---------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (("trainer.val_check_interval=0",), "error: trainer.val_check_interval must be an integer >= 1 or null, got 0"),
        (("sae.k=abc",), "error: sae.k must be an integer in [1, d_sae=256], got 'abc'"),
        (("trainer.max_steps=ten",), "error: trainer.max_steps must be an integer >= 1, got 'ten'"),
        (("module.betas=[0.9,1.5]",), "error: module.betas must be a list of 2 numbers each in [0, 1), got [0.9, 1.5]"),
        (("data.batch_size=0",), "error: data.batch_size must be an integer >= 1, got 0"),
        (("module.lr=nan",), "error: module.lr must be a finite number > 0, got nan"),
        (("trainer.precision=33",), "error: trainer.precision must be one of 32-true, 32, bf16-mixed"),
    ],
)
def test_bad_setting_is_one_line_naming_the_key(tmp_path, overrides, message):
    proc = run_train("sae=topk", "trainer.max_steps=5", *COMMON, *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(message), line
    assert strict_json(tmp_path / "metrics.json")["status"] == "failed"


def test_memory_refusal_names_the_sizes(tmp_path):
    proc = run_train("sae=topk", "sae.expansion_factor=null", "sae.d_sae=1000000000000", f"hydra.run.dir={tmp_path}",
                     *COMMON, check=False)
    line = error_line(proc)
    assert "d_in=64 x d_sae=1000000000000" in line and "TB" in line and "RAM has" in line, line


def test_bad_setting_fails_before_the_language_model_loads(tmp_path):
    # data=activations (the default) would load the LM and harvest a cache: k=0 is refused first.
    proc = run_train("sae=topk", "sae.k=0", f"data.cache_root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                     "logger=csv", check=False)
    assert error_line(proc) == "error: sae.k must be an integer >= 1, got 0"
    assert not (tmp_path / "cache").exists()


# --- files that are not what they claim -------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt")
    run_train("sae=topk", "trainer.max_steps=20", "trainer.val_check_interval=20", f"hydra.run.dir={run}", *COMMON)
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("kind", ["text", "truncated", "safetensors", "unsafe", "not_training", "other_sae"])
def test_bad_checkpoint_is_one_line(tmp_path, checkpoint, kind):
    bad = tmp_path / "bad.ckpt"
    extra = ()
    message = "is not a complete PyTorch checkpoint"
    if kind == "text":
        bad.write_text("not a checkpoint\n")
    elif kind == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif kind == "safetensors":
        save_file({"W_enc": torch.zeros(2, 2)}, str(bad))
    elif kind == "unsafe":  # a pickled object a safe load refuses: never unpickled
        torch.save({"state_dict": {}, "loops": {}, "path": PurePosixPath("/x")}, bad)
        message = "cannot be read safely as a checkpoint"
    elif kind == "not_training":
        torch.save({"W_enc": torch.zeros(2, 2)}, bad)
        message = "is not a training checkpoint"
    else:
        bad = checkpoint
        extra = ("sae.expansion_factor=2",)
        message = "does not fit this SAE"
    proc = run_train("sae=topk", "trainer.max_steps=40", "trainer.val_check_interval=20", *extra, f"ckpt_path={bad}",
                     f"hydra.run.dir={tmp_path / 'run'}", *COMMON, check=False)
    assert proc.returncode == 1
    assert message in error_line(proc)


# --- evaluate.py --------------------------------------------------------------------------------
def test_evaluate_refuses_missing_and_non_sae_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "nothing", "sae_path does not exist"), (tmp_path / "empty", "is not an SAE directory")):
        proc = run_train(f"sae_path={path}", "data=synthetic", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                         script="evaluate.py", check=False)
        assert proc.returncode == 1 and message in error_line(proc)


def test_evaluate_refuses_an_sae_with_non_finite_weights(tmp_path):
    sae_dir = save_sae(TopKSAE(d_in=64, d_sae=256, k=8), tmp_path / "sae")
    weights = load_file(str(sae_dir / "sae_weights.safetensors"))
    weights["W_dec"][3, 5] = float("nan")
    save_file(weights, str(sae_dir / "sae_weights.safetensors"))
    proc = run_train(f"sae_path={sae_dir}", "data=synthetic", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                     script="evaluate.py", check=False)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "sae_weights.safetensors: tensor 'W_dec' has 1 NaN/Inf values" in line, line
    assert strict_json(tmp_path / "run" / "metrics.json")["status"] == "failed"
    assert not (tmp_path / "run" / "eval.json").exists()


# --- the upgrade --------------------------------------------------------------------------------
UPGRADE_DATA = ("data=synthetic", "logger=csv", "data.batch_size=256", "data.d_in=16", "data.n_features=64")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    run_train("sae=relu", "trainer.max_steps=50", "trainer.val_check_interval=50", f"hydra.run.dir={run}", *UPGRADE_DATA)
    return run / "sae"


def test_upgrade_fine_tune_that_diverges_fails_and_keeps_finished_phases(tmp_path, teacher):
    proc = run_train("sae=rational", f"teacher.path={teacher}", "upgrade.steps=20", "upgrade.lr=1e30",
                     "upgrade.calibration_tokens=2048", "upgrade.calibration_steps=10", "upgrade.control=false",
                     f"hydra.run.dir={tmp_path}", *UPGRADE_DATA, check=False)
    assert proc.returncode == 1
    assert "training loss is not finite" in error_line(proc)
    assert strict_json(tmp_path / "metrics.json")["status"] == "failed"
    results = strict_json(tmp_path / "upgrade.json")
    assert {"teacher", "rsae_init"} <= set(results) and "rsae" not in results
    assert not (tmp_path / "rsae" / "cfg.json").exists()


def test_upgrade_interrupted_says_so_and_the_rerun_finishes(tmp_path, teacher):
    args = ("sae=rational", f"teacher.path={teacher}", "upgrade.steps=1000", "upgrade.calibration_tokens=2048",
            "upgrade.calibration_steps=10", "upgrade.control=false", f"hydra.run.dir={tmp_path}", *UPGRADE_DATA)
    proc = _spawn(*args)
    _wait_for(tmp_path / "csv" / "rsae" / "metrics.csv", proc)  # the fine-tune has logged its first steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["status"] == "interrupted" and f"hydra.run.dir={tmp_path}" in metrics["resume"]
    assert "rsae_init" in strict_json(tmp_path / "upgrade.json")
    assert Path(metrics["checkpoint"]) == (tmp_path / "rsae" / "interrupted.ckpt").resolve()
    assert 0 < metrics["step"] < 1000
    run_train(*shlex.split(metrics["resume"])[2:])
    assert strict_json(tmp_path / "metrics.json")["status"] == "ok"
    assert "rsae" in strict_json(tmp_path / "upgrade.json")
    assert not (tmp_path / "rsae" / "interrupted.ckpt").exists()
