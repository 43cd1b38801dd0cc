"""What a new user sees first: the README's examples give sensible numbers, the default job
validates once, the training bar counts steps, each log line is printed once, `--help` explains
the project."""

import json

from conftest import ROOT, run_train

SYNTHETIC = ("data=synthetic", "logger=csv", "data.batch_size=256")


def _val_rows(run_dir) -> int:
    lines = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("val/mse")
    return sum(1 for line in lines[1:] if line.split(",")[column])


def _readme_sweep_command() -> list[str]:
    """The README's sweep example, as its arguments (read from the README, so the two cannot drift)."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python train.py -m ")]
    assert len(lines) == 1, lines
    return lines[0].split()[2:]


def test_readme_sweep_example_gives_sensible_models(tmp_path):
    args = [a for a in _readme_sweep_command() if not a.startswith("hydra.sweep.dir=")]
    saes = next(a for a in args if a.startswith("sae=")).split("=", 1)[1].split(",")
    run_train(*args, f"hydra.sweep.dir={tmp_path}", timeout=900)
    for trial, sae in enumerate(saes):
        metrics = json.loads((tmp_path / str(trial) / "metrics.json").read_text())
        assert metrics["status"] == "ok", (sae, metrics)
        assert metrics["val/fvu"] < 0.5, (sae, metrics["val/fvu"])


def test_default_trainer_validates_once_and_still_checkpoints(tmp_path):
    proc = run_train("trainer.max_steps=30", "callbacks.model_checkpoint.every_n_train_steps=10",
                     "callbacks.model_checkpoint.save_top_k=-1", f"hydra.run.dir={tmp_path}", *SYNTHETIC)
    assert _val_rows(tmp_path) == 1  # only the final validation
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")) == [
        "step00000010.ckpt", "step00000020.ckpt", "step00000030.ckpt"]
    shown = proc.stdout + proc.stderr
    # every Lightning line once (Lightning's own handler and Hydra's would each print it)
    assert shown.count("`Trainer.fit` stopped: `max_steps=30` reached.") == 1
    assert "Seed set to 0" in (tmp_path / "train.log").read_text()  # and it still reaches the log file
    # the training bar counts steps, not an endless epoch ("Epoch 0/-2")
    assert "Training: 100%" in shown and "30/30" in shown and "Epoch" not in shown


def test_periodic_validation_when_asked(tmp_path):
    run_train("trainer.max_steps=30", "trainer.val_check_interval=10", f"hydra.run.dir={tmp_path}", *SYNTHETIC)
    assert _val_rows(tmp_path) == 4  # at steps 10, 20, 30 and the final one


def test_help_describes_the_project():
    text = run_train("--help").stdout
    assert "train a sparse autoencoder" in text and "python train.py sae=rational teacher.path=" in text
    options = ", ".join(sorted(p.stem for p in (ROOT / "conf" / "sae").glob("*.yaml")))
    assert f"sae: {options}" in text  # the groups and their options
    assert "Powered by Hydra" not in text
    text = run_train("--help", script="evaluate.py").stdout
    assert "evaluate an exported SAE" in text and "eval.n_tokens" in text
