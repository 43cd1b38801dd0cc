"""Harvesting into the cache: round trip, reuse, resume after a crash, mismatch and corruption errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

import rsae.data.cache as C
from rsae.data.harvest import harvest
from rsae.data.hooks import run_to_hook
from rsae.data.lm import load_lm
from rsae.data.tiny import make_tiny_lm, sample_text

CTX = 32


class SimulatedCrash(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harvest")
    text = root / "text.txt"
    text.write_text(sample_text(400, seed=1))
    return make_tiny_lm(root / "lm", "gpt2", vocab_size=400), text


def _harvest(cache_dir, setup, **overrides):
    lm_dir, text = setup
    args = dict(name_or_path=str(lm_dir), hook="resid_post", layer=1, text_files=[str(text)], n_tokens=64 * CTX,
                context_size=CTX, val_fraction=0.25, storage_dtype="float32", shard_mb=0.02, batch_size=4,
                progress=False)
    return harvest(cache_dir, **{**args, **overrides})


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache") / "c"
    return _harvest(cache_dir, setup)


def test_round_trip_rows_are_the_model_activations(built, setup):
    manifest = C.Manifest.load(built.root)
    data = manifest.data
    assert data["schema_version"] == C.SCHEMA_VERSION and data["d_in"] == 32
    assert data["request"]["hook"] == "resid_post" and data["request"]["layer"] == 1
    assert data["lm"]["module"] == "transformer.h.1" and data["tokenizer"]["sha256"]
    assert data["tokens"] == {"sequences": 64, "train_sequences": 48, "val_sequences": 16, "positions": 64 * CTX}
    assert len(manifest.shards("train")) > 3 and not (built.root / C.PROGRESS).exists()

    model, _ = load_lm(str(setup[0]))
    ids, keep = C.load_eval_tokens(built.root)
    assert ids.shape == (16, CTX) and not keep[:, 0].any()  # BOS excluded
    with torch.no_grad():
        expected = run_to_hook(model, "resid_post", 1, input_ids=ids)[keep]
    shards = [load_file(p) for p in manifest.shard_paths("val")]
    torch.testing.assert_close(torch.cat([s["acts"] for s in shards]), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([s["tokens"] for s in shards]).long(), ids[keep])
    seq = torch.cat([s["seq"] for s in shards]).long() - 48
    pos = torch.cat([s["pos"] for s in shards]).long()
    assert torch.equal(ids[seq, pos], ids[keep])
    assert manifest.rows("train") + manifest.rows("val") == 64 * (CTX - 1)
    train = torch.cat([load_file(p)["acts"] for p in manifest.shard_paths("train")])
    assert data["stats"]["mean_norm"] == pytest.approx(train.norm(dim=1).mean().item(), rel=1e-5)


def test_reuse_does_not_load_the_model(built, setup, monkeypatch):
    monkeypatch.setattr("rsae.data.harvest.load_lm", lambda *a, **k: pytest.fail("model loaded"))
    again = _harvest(built.root, setup)
    assert again.data["created"] == built.data["created"]


def test_resume_after_a_crash_gives_the_same_cache(setup, tmp_path, monkeypatch):
    reference = _harvest(tmp_path / "reference", setup)
    real_write, calls, crashed = C.write_shard, [], []

    def crash_on_fourth(path, tensors):
        calls.append(path)
        if len(calls) == 4 and not crashed:
            crashed.append(path)
            raise SimulatedCrash
        return real_write(path, tensors)

    monkeypatch.setattr(C, "write_shard", crash_on_fourth)
    with pytest.raises(SimulatedCrash):
        _harvest(tmp_path / "crashed", setup)
    assert (tmp_path / "crashed" / C.PROGRESS).exists() and not (tmp_path / "crashed" / C.MANIFEST).exists()
    calls.clear()
    resumed = _harvest(tmp_path / "crashed", setup)
    n_shards = sum(len(reference.shards(s)) for s in C.SPLITS)
    assert len(calls) == n_shards - 3  # the three finished shards were kept
    for split in C.SPLITS:
        assert [(s["file"], s["sha256"]) for s in resumed.shards(split)] == \
               [(s["file"], s["sha256"]) for s in reference.shards(split)]


def test_unfinished_harvest_for_another_request_is_an_error(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "write_shard", lambda *a: (_ for _ in ()).throw(SimulatedCrash()))
    with pytest.raises(SimulatedCrash):
        _harvest(tmp_path / "c", setup)
    monkeypatch.undo()
    with pytest.raises(C.CacheMismatchError, match="unfinished harvest.*layer: cache has 1, requested 2"):
        _harvest(tmp_path / "c", setup, layer=2)


@pytest.mark.parametrize("change, message", [
    (dict(layer=2), "layer: cache has 1, requested 2"),
    (dict(hook="mlp_out"), "hook"),
    (dict(context_size=16), "context_size"),
    (dict(d_in=64), "d_in: cache has 32, requested 64"),
    (dict(storage_dtype="bfloat16"), "storage_dtype"),
])
def test_a_mismatching_cache_is_an_error(built, setup, change, message):
    with pytest.raises(C.CacheMismatchError, match=message):
        _harvest(built.root, setup, **change)


def test_other_text_or_model_is_a_mismatch(built, setup, tmp_path):
    other_text = tmp_path / "other.txt"
    other_text.write_text(sample_text(400, seed=2))
    with pytest.raises(C.CacheMismatchError, match="text"):
        _harvest(built.root, setup, text_files=[str(other_text)])
    other_lm = make_tiny_lm(tmp_path / "lm2", "gpt2", vocab_size=400, seed=5)
    with pytest.raises(C.CacheMismatchError, match="model"):
        _harvest(built.root, (other_lm, setup[1]))


def _copy(built, tmp_path):
    import shutil

    shutil.copytree(built.root, tmp_path / "copy")
    return tmp_path / "copy"


def test_truncated_shard_is_an_error_naming_the_file(built, setup, tmp_path):
    cache_dir = _copy(built, tmp_path)
    shard = cache_dir / built.shards("train")[2]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(C.CacheCorruptError, match=f"{shard}.*truncated"):
        _harvest(cache_dir, setup)


def test_checksum_failure_is_an_error_naming_the_file(built, setup, tmp_path):
    cache_dir = _copy(built, tmp_path)
    shard = cache_dir / built.shards("val")[0]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(C.CacheCorruptError, match=f"{shard} fails its sha256"):
        _harvest(cache_dir, setup)
    _harvest(cache_dir, setup, verify_checksums=False)  # sizes still match: only the hash sees it


def test_corrupt_manifest_is_a_clear_error(built, setup, tmp_path):
    cache_dir = _copy(built, tmp_path)
    (cache_dir / C.MANIFEST).write_text("{not json")
    with pytest.raises(C.CacheCorruptError, match="manifest.json"):
        _harvest(cache_dir, setup)


def test_nan_activations_are_never_written(setup, tmp_path):
    model, tokenizer = load_lm(str(setup[0]))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias[3] = float("nan")
    with pytest.raises(C.NonFiniteActivationError, match="NaN/Inf"):
        _harvest(tmp_path / "c", setup, lm=(model, tokenizer))
    assert not list((tmp_path / "c").glob("*/*.safetensors"))
    progress = json.loads((tmp_path / "c" / C.PROGRESS).read_text())
    assert progress["splits"] == {"train": [], "val": []}


def test_bf16_storage_halves_the_bytes(setup, built, tmp_path):
    half = _harvest(tmp_path / "bf16", setup, storage_dtype="bfloat16", shard_mb=1)
    full = sum(s["bytes"] for s in built.shards("train"))
    assert sum(s["bytes"] for s in half.shards("train")) < 0.6 * full
    assert load_file(half.shard_paths("train")[0])["acts"].dtype == torch.bfloat16


def test_concurrent_harvests_wait_for_the_lock(setup, tmp_path):
    import threading

    cache_dir = tmp_path / "shared"
    result = {}
    with C.cache_lock(cache_dir):
        worker = threading.Thread(target=lambda: result.setdefault("m", _harvest(cache_dir, setup)))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not (cache_dir / C.PROGRESS).exists()  # waiting, not writing
    worker.join()
    assert result["m"].rows("train") > 0
