"""Harvesting into the cache: round trip, reuse, resume after a crash, mismatch and corruption errors."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import rsae.data.cache as C
import rsae.data.cache_manifest as M
import rsae.data.cache_write as W
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
    manifest = M.Manifest.load(built.root)
    data = manifest.data
    assert data["schema_version"] == C.SCHEMA_VERSION and data["d_in"] == 32
    assert data["request"]["hook"] == "resid_post" and data["request"]["layer"] == 1
    assert data["lm"]["module"] == "transformer.h.1" and data["tokenizer"]["sha256"]
    assert data["tokens"] == {"sequences": 64, "train_sequences": 48, "val_sequences": 16, "positions": 64 * CTX}
    assert len(manifest.shards("train")) > 3 and not (built.root / C.PROGRESS).exists()

    model, _ = load_lm(str(setup[0]))
    ids, keep = M.load_eval_tokens(built.root)
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
    real_write, calls, crashed = W.write_shard, [], []

    def crash_on_fourth(path, tensors):
        calls.append(path)
        if len(calls) == 4 and not crashed:
            crashed.append(path)
            raise SimulatedCrash
        return real_write(path, tensors)

    monkeypatch.setattr(W, "write_shard", crash_on_fourth)
    with pytest.raises(SimulatedCrash):
        _harvest(tmp_path / "crashed", setup)
    assert (tmp_path / "crashed" / C.PROGRESS).exists() and not (tmp_path / "crashed" / C.MANIFEST).exists()
    calls.clear()
    stale = tmp_path / "crashed" / "train" / "00099.safetensors.tmp"  # as a kill mid-write leaves one
    stale.write_bytes(b"partial")
    resumed = _harvest(tmp_path / "crashed", setup)
    assert not stale.exists()
    n_shards = sum(len(reference.shards(s)) for s in C.SPLITS)
    assert len(calls) == n_shards - 3  # the three finished shards were kept
    for split in C.SPLITS:
        assert [(s["file"], s["sha256"]) for s in resumed.shards(split)] == \
               [(s["file"], s["sha256"]) for s in reference.shards(split)]


def test_unfinished_harvest_for_another_request_is_an_error(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(W, "write_shard", lambda *a: (_ for _ in ()).throw(SimulatedCrash()))
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


def test_a_reused_cache_hashes_only_files_changed_since_their_last_hash(built, setup, tmp_path, monkeypatch):
    cache_dir = _copy(built, tmp_path)  # copytree keeps mtimes: the harvest's record still holds
    assert set(json.loads((cache_dir / C.HASHED).read_text())) == {f["file"] for f in built.files()}
    hashed = []
    real = M.verify_file
    monkeypatch.setattr(M, "verify_file", lambda path, n, sha: (sha and hashed.append(path.name), real(path, n, sha)))
    M.Manifest.load(cache_dir).verify()
    assert hashed == []
    shard = cache_dir / built.shards("train")[1]["file"]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: taken as unchanged
    M.Manifest.load(cache_dir).verify()
    assert hashed == []
    with pytest.raises(C.CacheCorruptError, match=f"{shard} fails its sha256"):
        M.Manifest.load(cache_dir).verify(rehash=True)
    shard.touch()  # a newer mtime: hashed again by a plain verify
    with pytest.raises(C.CacheCorruptError, match=f"{shard} fails its sha256"):
        M.Manifest.load(cache_dir).verify()
    (cache_dir / C.HASHED).write_text("{not json")  # an unreadable record only means: hash everything
    shard.write_bytes(bytes(data[:-5]) + bytes([data[-5] ^ 0xFF]) + bytes(data[-4:]))
    hashed.clear()
    M.Manifest.load(cache_dir).verify()
    assert len(hashed) == len(built.files())
    hashed.clear()
    writes = []
    monkeypatch.setattr(M, "record_hashed", lambda root, states: writes.append(root))
    M.Manifest.load(cache_dir).verify()  # the verify above recorded every file
    assert hashed == [] and writes == []  # nothing hashed: the record is not rewritten


def test_the_first_bad_shard_in_manifest_order_is_reported(built, tmp_path):
    cache_dir = _copy(built, tmp_path)
    bad = [cache_dir / built.shards("train")[1]["file"], cache_dir / built.shards("val")[-1]["file"]]
    for shard in bad:
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    manifest = M.Manifest.load(cache_dir)
    assert len(manifest.shards("train")) + len(manifest.shards("val")) > 4
    for _ in range(3):  # shards hashed 4 at a time: still the first bad one in manifest order
        with pytest.raises(C.CacheCorruptError, match=f"{bad[0]} fails its sha256"):
            manifest.verify(threads=4)


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
    with W.cache_lock(cache_dir):
        worker = threading.Thread(target=lambda: result.setdefault("m", _harvest(cache_dir, setup)))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not (cache_dir / C.PROGRESS).exists()  # waiting, not writing
    worker.join()
    assert result["m"].rows("train") > 0


# --- the manifest's own integrity -----------------------------------------------------------------
def _edit_manifest(cache_dir, edit, reseal=False):
    path = cache_dir / C.MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    if reseal:
        data[C.CHECKSUM_KEY] = C.json_digest(data)
    path.write_text(json.dumps(data))


def _one_line_error(error, pattern, call):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("edit", [
    lambda m: m["stats"].update(mean_norm=m["stats"]["mean_norm"] * 2),
    lambda m: m["stats"].update(mean_norm=0),
    lambda m: m.update(d_in=64),
    lambda m: m["splits"]["train"]["shards"].pop(),
])
def test_an_edited_manifest_is_refused_by_name(built, setup, tmp_path, edit):
    cache_dir = _copy(built, tmp_path)
    assert json.loads((cache_dir / C.MANIFEST).read_text())[C.CHECKSUM_KEY] == C.json_digest(built.data)
    _edit_manifest(cache_dir, edit)
    message = _one_line_error(C.CacheCorruptError, "checksum mismatch", lambda: _harvest(cache_dir, setup))
    assert message == f"{cache_dir / C.MANIFEST}: was edited (checksum mismatch); delete the cache to rebuild it"
    _one_line_error(C.CacheCorruptError, "checksum mismatch", lambda: M.Manifest.load(cache_dir))


def test_a_manifest_without_checksum_is_read_with_a_warning(built, setup, tmp_path):
    cache_dir = _copy(built, tmp_path)
    _edit_manifest(cache_dir, lambda m: m.pop(C.CHECKSUM_KEY))
    with pytest.warns(UserWarning, match="manifest.json has no checksum.*delete the cache to rebuild it"):
        again = _harvest(cache_dir, setup)
    assert again.rows("train") == built.rows("train")


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m["stats"].update(mean_norm=0), r"stats.mean_norm must be a finite number > 0, got 0"),
    (lambda m: m["stats"].update(mean_norm="3.1"), r"stats.mean_norm must be a finite number > 0"),
    (lambda m: m.update(d_in=64), r"says shard train/00000.safetensors holds F32 \[\d+, 64\] \(rows, d_in\) but it holds F32 \[\d+, 32\]"),
    (lambda m: m.update(d_in="32"), r"d_in must be an integer >= 1"),
    (lambda m: m["splits"]["val"]["shards"][0].update(file="../../elsewhere.safetensors"),
     r"splits.val.shards\[0\]: file must be a relative path inside the cache"),
    (lambda m: m["splits"]["train"]["shards"][1].update(rows=m["splits"]["train"]["shards"][1]["rows"] + 1),
     r"splits.train.rows must be the sum of its shards' rows"),
    (lambda m: m["request"].update(storage_dtype="int8"), r"request.storage_dtype must be"),
])
def test_fields_are_checked_in_a_manifest_without_checksum(built, setup, tmp_path, edit, pattern):
    cache_dir = _copy(built, tmp_path)
    _edit_manifest(cache_dir, lambda m: (m.pop(C.CHECKSUM_KEY), edit(m)))
    with pytest.warns(UserWarning, match="no checksum"):
        message = _one_line_error(C.CacheCorruptError, pattern, lambda: _harvest(cache_dir, setup, verify_checksums=False))
    assert message.startswith(str(cache_dir / C.MANIFEST))


def test_an_edited_progress_record_is_refused(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(W, "write_shard", lambda *a: (_ for _ in ()).throw(SimulatedCrash()))
    with pytest.raises(SimulatedCrash):
        _harvest(tmp_path / "c", setup)
    monkeypatch.undo()
    progress = tmp_path / "c" / C.PROGRESS
    state = json.loads(progress.read_text())
    state["seqs_per_shard"] += 1
    progress.write_text(json.dumps(state))
    _one_line_error(C.CacheCorruptError, f"{progress}: was edited", lambda: _harvest(tmp_path / "c", setup))


# --- writing fails: disk full, read-only, a file in the way ---------------------------------------
@pytest.mark.parametrize("fail_on", ["train/00003.safetensors", C.MANIFEST])
def test_disk_full_is_one_line_leaves_no_tmp_and_resumes(built, setup, tmp_path, monkeypatch, fail_on):
    real_write = W._write_all

    def fill_the_disk(handle, data):
        if handle.name.endswith(fail_on + ".tmp"):
            handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(handle, data)

    cache_dir = tmp_path / "c"
    monkeypatch.setattr(W, "_write_all", fill_the_disk)
    message = _one_line_error(C.CacheWriteError, "No space left on device", lambda: _harvest(cache_dir, setup))
    assert message.startswith(f"cannot write {cache_dir / fail_on}: No space left on device; free some space")
    assert not list(cache_dir.rglob("*.tmp")) and not (cache_dir / C.MANIFEST).exists()
    done = json.loads((cache_dir / C.PROGRESS).read_text())["splits"]
    n_shards = sum(len(built.shards(s)) for s in C.SPLITS)
    assert sum(map(len, done.values())) == (3 if fail_on != C.MANIFEST else n_shards)
    monkeypatch.undo()
    real_shard, written = W.write_shard, []
    monkeypatch.setattr(W, "write_shard", lambda path, tensors: written.append(path) or real_shard(path, tensors))
    resumed = _harvest(cache_dir, setup)
    assert len(written) == n_shards - sum(map(len, done.values()))  # only what the full disk left undone
    for split in C.SPLITS:
        assert [s["sha256"] for s in resumed.shards(split)] == [s["sha256"] for s in built.shards(split)]


def test_unwritable_cache_root_is_one_line(setup, tmp_path, monkeypatch):
    from pathlib import Path

    real_mkdir, root = Path.mkdir, tmp_path / "readonly"

    def refuse(self, *args, **kwargs):
        if str(self).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    message = _one_line_error(C.CacheWriteError, "Read-only file system", lambda: _harvest(root / "cache", setup))
    assert message == f"cannot write {root / 'cache'}: Read-only file system; choose a writable cache_dir (or cache_root)"


def test_read_only_cache_dir_is_one_line(setup, tmp_path, monkeypatch):
    import builtins

    cache_dir = tmp_path / "c"
    cache_dir.mkdir()

    def read_only_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(cache_dir)) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(W, "open", read_only_open, raising=False)
    _one_line_error(C.CacheWriteError, f"cannot write {cache_dir / '.lock'}: Permission denied; choose a writable",
                    lambda: _harvest(cache_dir, setup))


def test_cache_dir_or_root_that_is_a_file(setup, tmp_path):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    message = _one_line_error(C.CacheWriteError, "is a file", lambda: _harvest(a_file, setup))
    assert message == f"cannot write {a_file}: {a_file} is a file, not a directory; choose another cache_dir (or cache_root)"
    _one_line_error(C.CacheWriteError, f"cannot write {a_file / 'x' / 'c'}: {a_file} is a file, not a directory",
                    lambda: _harvest(a_file / "x" / "c", setup))


def test_the_verify_benchmark_times_each_thread_count(built, tmp_path):
    from rsae.bench import verify

    out = tmp_path / "verify.json"
    assert verify.main([str(built.root), "--threads", "1", "3", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"1", "3", "recorded"} and all(len(ts) == 2 for ts in result["seconds"].values())
    assert result["shards"] == len(built.shards("train")) + len(built.shards("val"))
