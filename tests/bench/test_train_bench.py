"""`python -m rsae.bench train` on the CPU with tiny shapes: it runs every architecture and variant,
the quality check and (when importable) SAELens, prints the Markdown tables and writes the JSON.
Also: the synthetic activation cache it writes for the end-to-end run is one ActivationDataModule
accepts. No timing assertions."""

from __future__ import annotations

import json

import torch

from rsae.bench import train as bench
from rsae.bench._models import ARCHS
from rsae.bench._step_timer import StepTimer
from rsae.bench._synthetic import data_overrides, write_synthetic_cache


def test_bench_cli_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--arch", ",".join(ARCHS), "--shapes", "8x128",
                     "--batch", "32", "--steps", "1", "--warmup", "1", "--repeats", "1", "--quality", "topk",
                     "--quality-steps", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| arch | d x m | batch | variant | ms/step |" in text
    assert "### Rational gate alone" in text and "### Quality" in text and "### Targets" in text
    results = json.loads(out.read_text())
    runs = [r for r in results["runs"] if r["kind"] == "rsae"]
    assert {(r["arch"], r["variant"]) for r in runs} == {(a, v) for a in ARCHS for v in ("plain", "fast")}
    assert all("ms" in r and "error" not in r for r in runs), [r.get("error") for r in runs]
    assert [r["match"] for r in results["runs"] if r["kind"] == "quality"] == [True]


def test_synthetic_cache_is_accepted_by_the_data_module(tmp_path):
    from rsae.data.activations import ActivationDataModule

    kwargs = write_synthetic_cache(tmp_path / "cache", d=12, n_train=1024, n_val=256, device=torch.device("cpu"))
    dm = ActivationDataModule(**kwargs, batch_size=64, num_workers=0, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.d_in == 12 and dm.norm_scale > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (64, 12) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    overrides = data_overrides(kwargs)
    assert f"data.cache_dir={tmp_path / 'cache'}" in overrides and "data.gguf_file=null" in overrides


def test_step_timer_leaves_out_validation(tmp_path):
    """Validation in the middle of the timed window and at the end is not training time."""
    import time

    import lightning as L

    from rsae.data.synthetic import SyntheticDataModule
    from rsae.lit.module import SAEModule
    from rsae.sae import ReLUSAE

    class SlowValidation(L.Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            time.sleep(0.4)

    timer = StepTimer(str(tmp_path / "timer.json"), skip=2)
    trainer = L.Trainer(max_steps=12, val_check_interval=6, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer, SlowValidation()])
    start = time.perf_counter()
    trainer.fit(SAEModule(ReLUSAE(8, 32)), datamodule=SyntheticDataModule(d_in=8, n_features=32, batch_size=16))
    wall = time.perf_counter() - start
    res = json.loads((tmp_path / "timer.json").read_text())
    assert res["steps"] == 10
    assert res["validation_s_excluded"] >= 0.4  # the validation at step 6 (the one at step 12 is after the clock)
    assert wall - res["seconds"] >= 0.8, (wall, res)  # both 0.4 s validations are outside the timed seconds


def test_unknown_variant_is_a_one_line_error():
    import pytest

    with pytest.raises(SystemExit, match="unknown variant 'compiled\\+base'"):
        bench.main(["--device", "cpu", "--variants", "compiled+base"])


def test_end_to_end_runs_with_and_without_the_captured_step(tmp_path):
    """`--e2e-cuda-graph false,true` runs train.py twice, the second with module.cuda_graph=true
    (on the CPU the same manual-optimisation path, uncaptured), and names the variants apart."""
    import pytest

    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--arch", "relu", "--shapes", "8x64", "--batch", "32", "--variants", "fast",
                     "--steps", "1", "--warmup", "1", "--repeats", "1", "--no-gate", "--no-saelens", "--e2e", "relu",
                     "--e2e-workers", "0", "--e2e-steps", "30", "--e2e-skip", "10", "--e2e-rows", "4096",
                     "--e2e-cuda-graph", "false,true", "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert rc == 0
    runs = [r for r in json.loads(out.read_text())["runs"] if r["kind"] == "e2e"]
    assert [r["variant"] for r in runs] == ["fast", "fast+graph"], [r.get("error") for r in runs]
    assert all(r["steps"] == 20 for r in runs)
    assert "module.cuda_graph=true" in runs[1]["command"] and "module.cuda_graph=false" in runs[0]["command"]
    with pytest.raises(SystemExit, match="--e2e-cuda-graph"):
        bench.main(["--device", "cpu", "--e2e-cuda-graph", "yes"])
