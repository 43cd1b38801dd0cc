"""`python -m rsae.bench train` on the CPU with tiny shapes: it runs every architecture and variant,
the quality check and (when importable) SAELens, prints the Markdown tables and writes the JSON.
Also: the synthetic activation cache it writes for the end-to-end run is one ActivationDataModule
accepts. No timing assertions."""

from __future__ import annotations

import json

import torch

from rsae.bench import train as bench


def test_bench_cli_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--arch", "relu,jumprelu,topk,batchtopk,rational", "--shapes", "8x128",
                     "--batch", "32", "--steps", "1", "--warmup", "1", "--repeats", "1", "--quality", "topk",
                     "--quality-steps", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| arch | d x m | batch | variant | ms/step |" in text
    assert "### Rational gate alone" in text and "### Quality" in text and "### Targets" in text
    results = json.loads(out.read_text())
    runs = [r for r in results["runs"] if r["kind"] == "rsae"]
    assert {(r["arch"], r["variant"]) for r in runs} == {(a, v) for a in bench.ARCHS for v in ("plain", "fast")}
    assert all("ms" in r and "error" not in r for r in runs), [r.get("error") for r in runs]
    assert [r["match"] for r in results["runs"] if r["kind"] == "quality"] == [True]


def test_synthetic_cache_is_accepted_by_the_data_module(tmp_path):
    from rsae.data.activations import ActivationDataModule

    kwargs = bench.write_synthetic_cache(tmp_path / "cache", d=12, n_train=1024, n_val=256, device=torch.device("cpu"))
    dm = ActivationDataModule(**kwargs, batch_size=64, num_workers=0, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.d_in == 12 and dm.norm_scale > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (64, 12) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    overrides = bench.data_overrides(kwargs)
    assert f"data.cache_dir={tmp_path / 'cache'}" in overrides and "data.gguf_file=null" in overrides
