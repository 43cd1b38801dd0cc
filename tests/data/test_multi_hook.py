"""Several hook points from one forward pass: one cache each, identical to single harvests; the
pass stops after the deepest hook point; the data module and train.py harvest them together."""

import json

import pytest
import torch

import rsae.data.cache as C
import rsae.data.cache_manifest as M
import rsae.data.cache_write as W
from conftest import run_train
from rsae.data.harvest import harvest, harvest_many
from rsae.data.hooks import capture_many, hook_points, run_to_hook, run_to_hooks
from rsae.data.lm import load_lm
from rsae.data.tiny import make_tiny_lm, sample_text

CTX = 32
POINTS = [("resid_post", 0), ("mlp_out", 1), ("resid_post", 2)]  # same width: one batch grid
TIMES = ("created", "harvest_seconds", C.CHECKSUM_KEY)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    text = root / "text.txt"
    text.write_text(sample_text(400, seed=2))
    return make_tiny_lm(root / "lm", "llama", vocab_size=400, n_layers=4), text, root


def _args(setup, **overrides):
    lm_dir, text, _ = setup
    args = dict(name_or_path=str(lm_dir), text_files=[str(text)], n_tokens=48 * CTX, context_size=CTX,
                val_fraction=0.25, storage_dtype="bfloat16", shard_mb=0.01, batch_size=3, progress=False)
    return {**args, **overrides}


def _files(manifest: M.Manifest) -> dict[str, bytes]:
    files = [s["file"] for split in C.SPLITS for s in manifest.shards(split)] + [C.EVAL_TOKENS]
    return {f: (manifest.root / f).read_bytes() for f in files}


def _without_times(manifest: M.Manifest) -> dict:
    return {k: v for k, v in manifest.data.items() if k not in TIMES}


@pytest.fixture(scope="module")
def together(setup):
    root = setup[2]
    return harvest_many([(root / f"one-pass-{h}.{l}", h, l) for h, l in POINTS], **_args(setup))


def test_hook_points_pair_every_hook_with_every_layer():
    assert hook_points("resid_post", 4) == [("resid_post", 4)]
    assert hook_points("resid_post", [4, 8, 12]) == [("resid_post", 4), ("resid_post", 8), ("resid_post", 12)]
    assert hook_points(["resid_post", "mlp_out"], [4, 8]) == [("resid_post", 4), ("resid_post", 8),
                                                               ("mlp_out", 4), ("mlp_out", 8)]


def test_one_pass_caches_equal_single_harvests_byte_for_byte(setup, together):
    root = setup[2]
    for (hook, layer), multi in zip(POINTS, together):
        single = harvest(root / f"single-{hook}.{layer}", hook=hook, layer=layer, **_args(setup))
        assert len(single.shards("train")) > 2  # several shards, so shard boundaries are exercised
        assert _files(multi) == _files(single)
        assert _without_times(multi) == _without_times(single)
        assert multi.data["request"]["hook"] == hook and multi.data["request"]["layer"] == layer


def test_one_pass_rows_are_each_hook_points_activations(setup, together):
    model, _ = load_lm(str(setup[0]))
    ids, keep = M.load_eval_tokens(together[0].root)
    from safetensors.torch import load_file

    for (hook, layer), manifest in zip(POINTS, together):
        with torch.inference_mode():
            expected = run_to_hook(model, hook, layer, input_ids=ids)[keep].to(torch.bfloat16)
        got = torch.cat([load_file(p)["acts"] for p in manifest.shard_paths("val")])
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_the_pass_stops_after_the_deepest_hook_point(setup):
    model, _ = load_lm(str(setup[0]))
    blocks = model.model.layers
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    ids = torch.randint(4, 300, (2, 16))
    try:
        with torch.inference_mode():
            outs = run_to_hooks(model, [("resid_post", 2), ("resid_pre", 1), ("mlp_out", 0)], input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1, 2]  # block 3 (of 4) never ran
    with torch.inference_mode():
        assert torch.equal(outs[0], run_to_hook(model, "resid_post", 2, input_ids=ids))
        assert torch.equal(outs[1], run_to_hook(model, "resid_pre", 1, input_ids=ids))
        assert torch.equal(outs[2], run_to_hook(model, "mlp_out", 0, input_ids=ids))
    with pytest.raises(RuntimeError, match="never fired"):
        with capture_many(model, [("resid_post", 0)]):
            pass


def test_one_forward_pass_per_batch_for_all_hook_points(setup, tmp_path, monkeypatch):
    import rsae.data.harvest as H

    calls = []
    real = H.run_to_hooks
    monkeypatch.setattr(H, "run_to_hooks", lambda model, points, **kw: calls.append(len(points)) or real(model, points, **kw))
    harvest_many([(tmp_path / str(i), h, l) for i, (h, l) in enumerate(POINTS)], **_args(setup))
    assert calls and all(n == 3 for n in calls)  # every batch (and the probe) hooks all three at once
    # the probe, then batches of 3 inside shards of 5 sequences: 36 training ones (7 x 2 + 1), 12 held out (2 + 2 + 1)
    assert len(calls) == 1 + 15 + 5


def test_an_interrupted_pass_resumes_each_cache(setup, together, tmp_path, monkeypatch):
    real, written = W.write_shard, []

    def crash_on_eighth(path, tensors):  # after 3, 3 and 2 shards of the three caches
        if len(written) == 7:
            raise KeyboardInterrupt("simulated kill")
        written.append(path)
        return real(path, tensors)

    targets = [(tmp_path / f"{h}.{l}", h, l) for h, l in POINTS]
    monkeypatch.setattr(W, "write_shard", crash_on_eighth)
    with pytest.raises(KeyboardInterrupt):
        harvest_many(targets, **_args(setup))
    monkeypatch.setattr(W, "write_shard", real)
    assert not any((t[0] / C.MANIFEST).exists() for t in targets)
    resumed = harvest_many(targets, **_args(setup))
    assert [_files(m) for m in resumed] == [_files(m) for m in together]


def test_mixed_widths_share_the_pass(setup, tmp_path):
    points = [("resid_post", 1), ("model.layers.1.mlp.gate_proj", 1)]  # widths 32 and 64
    caches = harvest_many([(tmp_path / str(i), h, l) for i, (h, l) in enumerate(points)], **_args(setup))
    assert [c.d_in for c in caches] == [32, 64]
    alone = harvest(tmp_path / "alone", hook=points[1][0], layer=1, **_args(setup))
    assert _files(caches[1]) == _files(alone)  # the finer shard grid: its own batches exactly
    # the other is cut into smaller batches than alone: the same rows, up to the BLAS's rounding
    from safetensors.torch import load_file

    single = harvest(tmp_path / "single", hook="resid_post", layer=1, **_args(setup))
    assert [s["sequences"] for s in caches[0].shards("train")] == [s["sequences"] for s in single.shards("train")]
    for a, b in zip(caches[0].shard_paths("train"), single.shard_paths("train")):
        torch.testing.assert_close(load_file(a)["acts"].float(), load_file(b)["acts"].float(), rtol=1e-2, atol=1e-2)


def test_an_existing_cache_is_validated_not_rebuilt(setup, together, monkeypatch):
    monkeypatch.setattr("rsae.data.harvest.load_lm", lambda *a, **k: pytest.fail("model loaded"))
    again = harvest_many([(m.root, h, l) for m, (h, l) in zip(together, POINTS)], **_args(setup))
    assert [m.data["created"] for m in again] == [m.data["created"] for m in together]


def test_train_cli_harvests_a_layer_list_then_multirun_reuses_it(setup, tmp_path):
    lm_dir, text, _ = setup
    data = (f"lm.name_or_path={lm_dir}", "data=activations", f"data.text_files=[{text}]", "data.n_tokens=4096",
            "data.context_size=32", f"data.cache_root={tmp_path / 'caches'}", "data.batch_size=64", "logger=none",
            "callbacks.downstream_eval=null", "trainer.max_steps=4", "trainer.val_check_interval=null")
    proc = run_train(*data, "lm.layer=[0,2]", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "-m lm.layer=0,2" in proc.stderr  # training one SAE per run: one line
    run_train(*data, "lm.layer=[0,2]", "cache_only=true", f"hydra.run.dir={tmp_path / 'harvest'}")
    dirs = sorted((tmp_path / "caches" / "lm").iterdir())
    assert [d.name for d in dirs] == ["resid_post.0-4096x32-bfloat16", "resid_post.2-4096x32-bfloat16"]
    manifests = [M.Manifest.load(d) for d in dirs]
    assert manifests[0].data["harvest_seconds"] == manifests[1].data["harvest_seconds"]  # one pass
    run_train("-m", *data, "lm.layer=0,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    for trial, manifest in zip(("0", "1"), manifests):
        assert json.loads((tmp_path / "sweep" / trial / "metrics.json").read_text())["status"] == "ok"
        assert M.Manifest.load(manifest.root).data["created"] == manifest.data["created"]  # reused


def test_first_multirun_trial_harvests_every_listed_layer(setup, tmp_path):
    lm_dir, text, _ = setup
    run_train("-m", f"lm.name_or_path={lm_dir}", "data=activations", f"data.text_files=[{text}]", "data.n_tokens=4096",
              "data.context_size=32", f"data.cache_root={tmp_path / 'caches'}", "data.batch_size=64", "logger=none",
              "callbacks.downstream_eval=null", "trainer.max_steps=2", "trainer.val_check_interval=null", "lm.layer=1,3",
              "data.harvest_layers=[1,3]", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    manifests = [M.Manifest.load(d) for d in sorted((tmp_path / "caches" / "lm").iterdir())]
    assert [m.data["request"]["layer"] for m in manifests] == [1, 3]
    assert manifests[0].data["harvest_seconds"] == manifests[1].data["harvest_seconds"]  # filled by trial 0's pass
    assert all(json.loads((tmp_path / "sweep" / t / "metrics.json").read_text())["status"] == "ok" for t in "01")


def test_default_batch_is_small_on_the_cpu(setup, tmp_path, monkeypatch):
    import rsae.data.harvest as H

    sizes = []
    real = H._harvest_rows
    monkeypatch.setattr(H, "_harvest_rows", lambda model, points, tokens, keep, lo, hi, store:
                        sizes.append(hi - lo) or real(model, points, tokens, keep, lo, hi, store))
    manifest = harvest(tmp_path / "c", hook="resid_post", layer=1, **_args(setup, batch_size=None, shard_mb=1.0))
    # 36 training sequences in one shard: batches of CPU_HARVEST_BATCH (8), the last one shorter
    assert max(sizes) == H.CPU_HARVEST_BATCH == 8 and sizes[:4] == [8, 8, 8, 8]
    assert manifest.data["args"]["batch_size"] == 8
