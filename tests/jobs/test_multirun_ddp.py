"""Multirun (one process per trial, failures recorded) and DDP with 2 CPU processes (gloo)."""

import json

import pytest

from conftest import run_train


def test_multirun_records_failed_trials_and_keeps_the_others(tmp_path):
    proc = run_train(
        "-m", "sae=relu,topk", "module.lr=0.001,-1", "data=synthetic", "trainer.max_steps=30",
        "trainer.val_check_interval=30", "data.batch_size=128", "logger=csv", f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0
    status = {d.name: json.loads((d / "metrics.json").read_text())["status"] for d in tmp_path.iterdir() if d.is_dir()}
    assert status == {"0": "ok", "1": "failed", "2": "ok", "3": "failed"}
    assert "module.lr must be a finite number > 0" in json.loads((tmp_path / "1" / "metrics.json").read_text())["error"]
    assert (tmp_path / "0" / "sae" / "cfg.json").is_file() and (tmp_path / "2" / "sae" / "cfg.json").is_file()


@pytest.mark.parametrize("compression", ["none", "bf16"])
def test_ddp_two_cpu_processes(tmp_path, compression):
    run_train(
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data=synthetic", "sae=topk",
        "trainer.max_steps=40", "trainer.val_check_interval=20", "data.batch_size=128", "logger=csv",
        f"trainer.strategy.grad_compression={compression}", f"hydra.run.dir={tmp_path}",
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["train/steps"] == 40
    assert metrics["val/l0"] > 0 and 0 < metrics["val/alive"] <= 1
    # Only rank 0 exports; the second process logged to its own file in the same run dir.
    assert (tmp_path / "sae" / "sae_weights.safetensors").is_file()
    assert (tmp_path / "train_ddp_process_1.log").is_file()


def test_ddp_strategy_options():
    from rsae.errors import ConfigError
    from rsae.lit.ddp import ddp_strategy

    assert ddp_strategy()._ddp_comm_hook is None
    assert ddp_strategy("bf16")._ddp_comm_hook.__name__ == "bfloat16_avg_allreduce_hook"
    assert ddp_strategy("fp16")._ddp_comm_hook.__name__ == "float16_avg_allreduce_hook"
    assert ddp_strategy("fp16", bucket_cap_mb=100)._ddp_kwargs["bucket_cap_mb"] == 100
    with pytest.raises(ConfigError, match="grad_compression"):
        ddp_strategy("int8")
