"""The training stream's order: coverage per epoch, rank/worker split, determinism, resume."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from rsae.data.cache_write import write_shard
from rsae.data.stream import StreamLoader, TrainStream, ValStream, batches_before

D = 4


def make_shards(directory, rows_per_shard, dtype=torch.float32):
    """Shards whose row r (counting across shards) is the vector (r, r, r, r), so ids are exact
    (in float32; bf16 rounds ids above 256)."""
    directory.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for i, n in enumerate(rows_per_shard):
        ids = torch.arange(start, start + n, dtype=torch.float32)
        path = directory / f"{i:05d}.safetensors"
        write_shard(path, {"acts": ids[:, None].expand(n, D).contiguous().to(dtype)})
        files.append(path)
        start += n
    return files, list(rows_per_shard)


def ids(batch):
    return batch[:, 0].long().tolist()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), [300, 170, 250, 64, 400])  # 1184 rows


def stream(shards, **kw):
    args = dict(batch_size=32, seed=0, block_rows=50, shuffle_buffer=200)
    return TrainStream(*shards, **{**args, **kw})


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_batches_are_float32_and_deterministic(shards):
    first = take(iter(stream(shards)), 10)
    assert all(b.shape == (32, D) and b.dtype == torch.float32 for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, take(iter(stream(shards)), 10)))
    other = take(iter(stream(shards, seed=1)), 10)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_each_epoch_visits_every_row_once_across_slots(shards):
    n_rows, n_slots = sum(shards[1]), 6  # e.g. 3 ranks x 2 workers
    s = stream(shards, batch_size=1)
    seen = []
    for epoch in range(3):
        seen, skip = [], 0
        for slot in range(n_slots):
            skip = sum(int(s.block_sizes[s.epoch_blocks(slot, n_slots, e)].sum()) for e in range(epoch))
            mine = int(s.block_sizes[s.epoch_blocks(slot, n_slots, epoch)].sum())
            seen += [i for b in take(s.slot_batches(slot, n_slots, skip), mine) for i in ids(b)]
        assert sorted(seen) == list(range(n_rows))


def test_ranks_read_disjoint_rows_and_never_run_dry(shards):
    ranks = [take(iter(stream(shards, rank=r, world_size=2)), 15) for r in range(2)]
    assert all(len(r) == 15 for r in ranks)  # endless: any number of steps, same on every rank
    rows = [set(i for b in r for i in ids(b)) for r in ranks]
    assert not rows[0] & rows[1]  # 15 * 32 * 2 = 960 < 1184 rows: within the first epoch


def test_stream_continues_across_epochs(shards):
    rows = [i for b in take(iter(stream(shards)), 3 * 1184 // 32) for i in ids(b)]
    counts = torch.bincount(torch.tensor(rows), minlength=1184)
    assert counts.min() >= 2 and counts.max() <= 4  # ~3 epochs, each a fresh permutation
    assert rows[:1184] != rows[1184:2368]


def test_shuffle_mixes_blocks_from_several_shards(shards):
    rows = ids(next(iter(stream(shards, batch_size=200, shuffle_buffer=400))))
    shard_of = torch.bucketize(torch.tensor(rows), torch.tensor([300, 470, 720, 784]), right=True)
    assert len(set(shard_of.tolist())) >= 3


def test_worker_role_after_resume():
    # with 3 workers the rank's batch b comes from role b % 3; after 7 batches role 1 is next
    assert [batches_before(7, role, 3) for role in range(3)] == [3, 2, 2]
    assert [batches_before(0, role, 3) for role in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_workers_matches_the_definition_and_resumes_exactly(shards, workers):
    def loader(start):
        return DataLoader(stream(shards, start_batch=start, world_size=2, rank=1), batch_size=None,
                          num_workers=workers)

    full = take(iter(loader(0)), 12)
    n_workers = max(workers, 1)
    s = stream(shards, world_size=2, rank=1)
    by_role = [take(s.slot_batches(1 * n_workers + role, 2 * n_workers), 12) for role in range(n_workers)]
    for b, batch in enumerate(full):
        assert torch.equal(batch, by_role[b % n_workers][b // n_workers])
    for start in (5, 6):
        resumed = take(iter(loader(start)), 12 - start)
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[start:]))


def test_resume_far_ahead_reads_only_the_needed_window(shards, monkeypatch):
    s = stream(shards, start_batch=10_000)
    reads = []
    real = s.shards.load
    monkeypatch.setattr(s.shards, "load", lambda pieces, *a: reads.extend(pieces) or real(pieces, *a))
    expected = take(stream(shards).slot_batches(0, 1, 10_000), 1)[0]
    assert torch.equal(next(iter(s)), expected)
    assert len(reads) <= 2 * 4  # this window and the one read ahead (4 blocks each), not 10k batches


def test_stream_loader_restarts_at_the_current_position(shards):
    position = {"value": 0}
    loader = StreamLoader(stream(shards), batch_size=None)
    loader.position_fn = lambda: position["value"]
    first = take(iter(loader), 4)
    position["value"] = 4
    second = take(iter(loader), 2)
    assert torch.equal(second[0], take(iter(stream(shards)), 5)[4])
    assert not torch.equal(second[0], first[0])


def test_val_stream_is_ordered_and_complete(shards):
    batches = list(ValStream(*shards, batch_size=100))
    assert [len(b) for b in batches] == [100] * 11 + [84]
    assert [i for b in batches for i in ids(b)] == list(range(1184))


def test_val_stream_gives_every_rank_the_same_count(shards):
    per_rank = [list(ValStream(*shards, batch_size=100, rank=r, world_size=5)) for r in range(5)]
    assert {len(p) for p in per_rank} == {3}  # 12 batches over 5 ranks: padded to 15 with repeats
    seen = {i for p in per_rank for b in p for i in ids(b)}
    assert seen == set(range(1184))


def test_val_stream_with_workers_keeps_the_order(shards):
    batches = list(DataLoader(ValStream(*shards, batch_size=100), batch_size=None, num_workers=2))
    assert [i for b in batches for i in ids(b)] == list(range(1184))


def test_bad_stream_arguments(shards, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        stream(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no rows"):
        TrainStream([], [], batch_size=4)


def test_a_shard_truncated_under_a_running_stream_is_named(shards, tmp_path):
    import shutil

    from rsae.data.cache import CacheCorruptError

    files = [shutil.copy(f, tmp_path / f.name) for f in shards[0]]
    with open(files[1], "r+b") as handle:
        handle.truncate(200)
    with pytest.raises(CacheCorruptError, match="00001.safetensors"):
        take(iter(stream(([tmp_path / f.name for f in shards[0]], shards[1]))), 40)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_side_gather_gives_the_same_batches(tmp_path, dtype, device):
    """The device-side shuffle (window copied to a device, batches gathered there) reads the same
    rows in the same order as the host gather, across window and epoch boundaries, and resumes
    the same way. On CUDA the positions cross through reused pinned buffers. A bf16 cache crosses
    narrow and is widened on the device: the same float32 batches as the host's widening. On CUDA
    the gathers are held back behind a long kernel while the loader runs ahead, so a window's
    memory reused before its gathers ran would show."""
    shards = make_shards(tmp_path, [300, 170, 250, 64, 400], dtype)
    host = take(iter(stream(shards, start_batch=3)), 60)  # 1920 rows: past an epoch of 1184
    if device == "cuda":
        torch.cuda._sleep(500_000_000)  # about 0.3 s of GPU time before any gather can run
    dev = [b.cpu() for b in take(iter(stream(shards, start_batch=3, device=device)), 60)]
    assert all(a.dtype == b.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(host, dev))
    assert len(dev) == 60 and len({float(b[0, 0]) for b in dev}) > 1


def test_device_side_gather_refuses_loader_workers(shards):
    loader = DataLoader(stream(shards, device="cpu"), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(loader))


def test_datamodule_rejects_impossible_shuffle_device():
    from rsae.data.activations import ActivationDataModule

    with pytest.raises(ValueError, match="num_workers=0"):
        ActivationDataModule("x", text_files=["x"], layer=0, shuffle_device="cuda", num_workers=2)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        ActivationDataModule("x", text_files=["x"], layer=0, shuffle_device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ActivationDataModule("x", text_files=["x"], layer=0, shuffle_device="cuda")


def test_reused_batch_buffers_give_the_same_batches_and_cycle(shards):
    fresh = take(iter(stream(shards)), 50)  # crosses windows (carry batches) and an epoch
    ring, ptrs = [], []
    for batch in itertools.islice(iter(stream(shards, reuse_buffers=3)), 50):
        ptrs.append(batch.data_ptr())
        ring.append(batch.clone())  # a consumer done with each batch before the next ones
    assert all(torch.equal(a, b) for a, b in zip(fresh, ring))
    assert len(set(ptrs)) <= 3 + 10  # the ring's 3 buffers (+ the window-crossing batches, fresh)
    assert ptrs.count(ptrs[0]) > 5


def test_an_epoch_is_cut_into_windows_of_equal_block_counts(shards):
    """25 blocks at 4 per window: 7 windows of 3-4 blocks, not 6 of 4 and a last one of 1 (which
    would shuffle few rows and be used up before the next window is read)."""
    s = stream(shards, block_rows=50, shuffle_buffer=200)
    assert len(s.blocks) == 25 and s._window_blocks(1) == 4
    epoch0 = [w for w in itertools.islice(s.windows(0, 1), 20) if w[0] == 0]
    counts = [len(w[2]) for w in epoch0]
    assert sum(counts) == 25 and len(counts) == 7 and set(counts) == {3, 4}
    assert [w[1] for w in epoch0] == list(range(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_window_reads_match_one_thread(tmp_path, dtype):
    """A window read by several threads (each a run of blocks) holds the same rows in the same
    places as one read on one thread, widened or as stored."""
    import numpy as np

    files, rows = make_shards(tmp_path, [300, 170, 250, 64, 400], dtype)
    s = stream((files, rows))
    pieces = s.blocks[s.epoch_blocks(0, 1, 0)[:11]]  # 11 blocks from several shards, shuffled
    n = int((pieces[:, 2] - pieces[:, 1]).sum())
    stored = np.int16 if dtype == torch.bfloat16 else np.float32
    for out_dtype in {np.float32, stored}:
        one, four = np.full((n, D), -1, dtype=out_dtype), np.full((n, D), -2, dtype=out_dtype)
        s.shards.load(pieces, one)
        s.shards.load(pieces, four, threads=4)
        assert np.array_equal(one, four)
    ids = torch.tensor(np.concatenate([np.arange(a, b) + sum(rows[:sh]) for sh, a, b in pieces.tolist()]))
    wide = np.empty((n, D), dtype=np.float32)
    s.shards.load(pieces, wide, threads=3)
    assert torch.equal(torch.from_numpy(wide[:, 0]), ids.to(dtype).float())  # (bf16 rounds ids above 256)
