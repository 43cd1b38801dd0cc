"""The harvest's background shard writer: the cache is the one a sequential harvest writes (every
shard recomputed here batch by batch), the writer's failures stop the harvest with their own error
and leave it resumable, and the writer keeps order and drops queued work on an interrupt."""

import hashlib
import json
import threading

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import rsae.data.cache as C
import rsae.data.cache_write as W
import rsae.data.harvest as H
from rsae.data.cache_manifest import load_eval_tokens
from rsae.data.hooks import run_to_hooks
from rsae.data.lm import load_lm
from rsae.data.shard_writer import ShardWriter
from rsae.data.text import expand_text_files, iter_file_documents, keep_mask, tokenize_sequences
from rsae.data.tiny import make_tiny_lm, sample_text

CTX, BATCH = 32, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("writer")
    text = root / "text.txt"
    text.write_text(sample_text(400, seed=3))
    return make_tiny_lm(root / "lm", "gpt2", vocab_size=400), text


def _harvest(cache_dir, setup, **overrides):
    lm_dir, text = setup
    args = dict(name_or_path=str(lm_dir), hook="resid_post", layer=1, text_files=[str(text)], n_tokens=64 * CTX,
                context_size=CTX, val_fraction=0.25, storage_dtype="bfloat16", shard_mb=0.01, batch_size=BATCH,
                progress=False)
    return H.harvest(cache_dir, **{**args, **overrides})


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    return _harvest(tmp_path_factory.mktemp("ref") / "c", setup)


def _shards(manifest):
    return [(s["file"], s["bytes"], s["sha256"], s["rows"], s["sequences"], s["norm_sum"])
            for split in C.SPLITS for s in manifest.shards(split)]


def _listed_files_on_disk(root):
    state = json.loads((root / C.PROGRESS).read_text())
    listed = sorted(s["file"] for split in C.SPLITS for s in state["splits"][split])
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.safetensors"))
    return listed, on_disk


def test_every_shard_is_the_sequential_harvests_bytes(setup, reference):
    """Each shard, rebuilt here the way a harvest without the writer builds it (a forward pass per
    batch of BATCH sequences inside the shard, rows cut, cast, concatenated, serialised): the same
    bytes, sha256, rows and norm sum."""
    model, tokenizer = load_lm(str(setup[0]))
    tokens = tokenize_sequences(tokenizer, iter_file_documents(expand_text_files([str(setup[1])])), CTX, 64 * CTX)
    keep = keep_mask(tokens, tokenizer, True)
    assert torch.equal(load_eval_tokens(reference.root)[0], tokens[48:])
    shards = [s for split in C.SPLITS for s in reference.shards(split)]
    assert len(shards) > 2 * (H.SHARD_QUEUE_DEPTH + 2)  # more shards than the writer holds
    for shard in shards:
        first, last = shard["sequences"]
        parts = []
        for a in range(first, last, BATCH):
            b = min(a + BATCH, last)
            with torch.inference_mode():
                out = run_to_hooks(model, [("resid_post", 1)], input_ids=tokens[a:b])[0]
            mask = keep[a:b]
            parts.append({"acts": out[mask].to(torch.bfloat16), "tokens": tokens[a:b][mask].to(torch.int32),
                          "seq": torch.arange(a, b, dtype=torch.int32)[:, None].expand(-1, CTX)[mask],
                          "pos": torch.arange(CTX, dtype=torch.int32)[None, :].expand(b - a, -1)[mask]})
        rows = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        data = safetensors_bytes(rows)
        assert (reference.root / shard["file"]).read_bytes() == data
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["rows"] == rows["acts"].shape[0]
        assert shard["norm_sum"] == float(rows["acts"].float().norm(dim=1).double().sum())


def test_a_failing_write_stops_the_harvest_and_resumes(setup, reference, tmp_path, monkeypatch):
    real_write, real_rows, writes, passes = W.write_shard, H._harvest_rows, [], []
    error = C.CacheWriteError("cannot write x: No space left on device; free some space")

    def fail_on_second(path, tensors):
        writes.append(path)
        if len(writes) == 2:
            raise error
        return real_write(path, tensors)

    monkeypatch.setattr(W, "write_shard", fail_on_second)
    monkeypatch.setattr(H, "_harvest_rows", lambda *a: passes.append(a[4:6]) or real_rows(*a))
    with pytest.raises(C.CacheWriteError) as info:
        _harvest(tmp_path / "c", setup)
    assert info.value is error and len(writes) == 2  # the same error; nothing written after it
    # the forward passes stopped: shards 1 and 2 written, at most SHARD_QUEUE_DEPTH queued, one being filled
    passes_per_shard = -(-reference.shards("train")[0]["sequences"][1] // BATCH)  # 2 (shards of 5 sequences)
    assert len(passes) <= (2 + H.SHARD_QUEUE_DEPTH + 1) * passes_per_shard
    assert len(passes) < sum(-(-(s["sequences"][1] - s["sequences"][0]) // BATCH)
                             for split in C.SPLITS for s in reference.shards(split))
    listed, on_disk = _listed_files_on_disk(tmp_path / "c")
    assert listed == on_disk == ["train/00000.safetensors"] and not list((tmp_path / "c").rglob("*.tmp"))
    monkeypatch.undo()
    assert _shards(_harvest(tmp_path / "c", setup)) == _shards(reference)


def test_nan_in_a_later_batch_names_it_keeps_the_shards_before_and_resumes(setup, reference, tmp_path, monkeypatch):
    real, calls = H.run_to_hooks, []

    def nan_in_sixth(model, points, **kw):  # the probe, then batches 0-3, 4, 5-8, 9, 10-13: shards of 5
        outs = real(model, points, **kw)
        calls.append(1)
        if len(calls) == 6:
            outs[0][0, 1, 0] = float("nan")
        return outs

    monkeypatch.setattr(H, "run_to_hooks", nan_in_sixth)
    with pytest.raises(C.NonFiniteActivationError) as info:
        _harvest(tmp_path / "c", setup)
    assert str(info.value) == ("1 NaN/Inf activation values in sequences 10-13 (resid_post at layer 1); "
                               "refusing to write them to the cache")
    listed, on_disk = _listed_files_on_disk(tmp_path / "c")
    assert listed == on_disk == ["train/00000.safetensors", "train/00001.safetensors"]
    monkeypatch.undo()
    assert _shards(_harvest(tmp_path / "c", setup)) == _shards(reference)


def test_the_writer_runs_jobs_in_order_and_raises_their_error_once_done():
    done = []
    with ShardWriter(depth=2) as writer:
        for i in range(20):
            writer.submit(lambda i=i: done.append(i))
    assert done == list(range(20))
    boom = ValueError("disk on fire")
    with pytest.raises(ValueError) as info:
        with ShardWriter(depth=2) as writer:
            writer.submit(lambda: (_ for _ in ()).throw(boom))
            writer.submit(lambda: done.append("after"))
    assert info.value is boom and done[-1] == 19  # the job after the failure never ran


def test_an_interrupt_drops_queued_jobs_and_waits_for_the_running_one():
    started, go, done = threading.Event(), threading.Event(), []
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(depth=4) as writer:
            writer.submit(lambda: (started.set(), go.wait(), done.append("running")))
            writer.submit(lambda: done.append("queued"))
            started.wait()
            threading.Timer(0.3, go.set).start()  # lets the running job end after the interrupt
            raise KeyboardInterrupt
    assert done == ["running"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nan", [False, True])
def test_cuda_harvest_copies_rows_without_waiting(setup, tmp_path, nan):
    model, tokenizer = load_lm(str(setup[0]), device="cuda")
    if nan:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_proj.bias[3] = float("nan")
        with pytest.raises(C.NonFiniteActivationError, match="NaN/Inf activation values in sequences 0-3"):
            _harvest(tmp_path / "c", setup, lm=(model, tokenizer), device="cuda")
        return
    manifest = _harvest(tmp_path / "c", setup, lm=(model, tokenizer), device="cuda")
    from safetensors.torch import load_file

    ids, keep = load_eval_tokens(manifest.root)
    with torch.inference_mode():
        expected = run_to_hooks(model, [("resid_post", 1)], input_ids=ids.cuda())[0][keep.cuda()].cpu()
    got = torch.cat([load_file(p)["acts"] for p in manifest.shard_paths("val")])
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
