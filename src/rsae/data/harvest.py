"""Fill an activation cache: tokenise text, run the LM up to the hook point, write shards.

    harvest("/data/cache/smollm2-L6", name_or_path=..., gguf_file=..., hook="resid_post", layer=6,
            text_files=["plays/"], n_tokens=200_000, context_size=128)

An existing complete cache is validated against the request and returned; an interrupted harvest
(`progress.json` present) resumes at the first shard not yet written.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from rsae.data import cache as C
from rsae.data import cache_manifest as M
from rsae.data import cache_write as W
from rsae.data.hooks import resolve_hook, run_to_hooks
from rsae.data.lm import check_lm_source, lm_identity, load_lm, tokenizer_sha256, torch_dtype
from rsae.data.shard_writer import InFlight, ShardWriter
from rsae.data.text import (
    expand_text_files,
    iter_file_documents,
    iter_hub_documents,
    keep_mask,
    resolve_document_separator,
    split_sizes,
    text_files_sha256,
    tokenize_sequences,
)


# Sequences per forward pass when none is given: small on a CPU (the pass is compute-bound already),
# large on a GPU (a pass of 8 x 128 tokens through a small LM is kernel-launch-bound).
CPU_HARVEST_BATCH = 8
GPU_HARVEST_BATCH = 128
# Finished shards waiting for the background writer (`rsae.data.shard_writer`) at most.
SHARD_QUEUE_DEPTH = 3


def build_request(*, name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                  lm_dtype: str = "float32", hook: str = "resid_post", layer: int | None = 0,
                  text_files: Sequence[str] | None = None, dataset: str | None = None,
                  dataset_config: str | None = None, dataset_split: str = "train", text_column: str = "text",
                  context_size: int = 128, n_tokens: int = 100_000, val_fraction: float = 0.1,
                  storage_dtype: str = "bfloat16", prepend_bos: bool = True,
                  exclude_special_tokens: bool = True, document_separator: str = "auto") -> dict:
    """Everything that determines the cache's contents, in the form stored in the manifest."""
    if (text_files is None) == (dataset is None):
        raise ValueError("give exactly one text source: text_files (local files) or dataset (hub name)")
    if dataset is not None:
        text = {"source": "hub", "name": dataset, "config": dataset_config, "split": dataset_split, "column": text_column}
    else:
        text = {"source": "files", "sha256": text_files_sha256(expand_text_files(list(text_files)))}
    separator = resolve_document_separator(document_separator, text_files, dataset)
    if separator != "text":  # caches made before the setting existed joined files' documents with text
        text["document_separator"] = separator
    check_lm_source(name_or_path, gguf_file)
    return {
        "model": lm_identity(name_or_path, gguf_file, revision),
        "lm_dtype": str(torch_dtype(lm_dtype)).removeprefix("torch."),
        "hook": hook,
        "layer": None if layer is None else int(layer),
        "text": text,
        "context_size": int(context_size),
        "n_tokens": int(n_tokens),
        "val_fraction": float(val_fraction),
        "storage_dtype": C.canonical_storage_dtype(storage_dtype),
        "prepend_bos": bool(prepend_bos),
        "exclude_special_tokens": bool(exclude_special_tokens),
    }


def harvest(cache_dir: str | Path, *, hook: str = "resid_post", layer: int | None = 0, **kwargs) -> M.Manifest:
    """Build (or validate and reuse) the activation cache at `cache_dir`; returns its Manifest.

    Keyword arguments as for `harvest_many`, which this is for one hook point.
    """
    return harvest_many([(cache_dir, hook, layer)], **kwargs)[0]


def harvest_many(targets: Sequence[tuple[str | Path, str, int | None]], *, name_or_path: str,
                 gguf_file: str | None = None, revision: str | None = None, lm_dtype: str = "float32",
                 text_files: Sequence[str] | None = None, dataset: str | None = None,
                 dataset_config: str | None = None, dataset_split: str = "train", text_column: str = "text",
                 n_tokens: int = 100_000, context_size: int = 128, val_fraction: float = 0.1,
                 storage_dtype: str = "bfloat16", prepend_bos: bool = True, exclude_special_tokens: bool = True,
                 document_separator: str = "auto", batch_size: int | None = None, shard_mb: float = 64, device: str = "auto",
                 verify_checksums: bool = True, d_in: int | None = None, progress: bool = True,
                 lm: tuple | None = None) -> list[M.Manifest]:
    """Caches for several `(cache_dir, hook, layer)` targets of one model and text, the missing
    ones filled in one forward pass per batch (stopped after the deepest hook point); returns
    their Manifests in order. Each cache is the one `harvest` writes for its hook point alone:
    the same shards, byte for byte, and the same manifest but for its times.

    `batch_size` is in sequences per forward pass (None: GPU_HARVEST_BATCH on a GPU, where small
    passes leave it idle, else CPU_HARVEST_BATCH); `shard_mb` is the target shard size; `lm` is an
    optional already-loaded `(model, tokenizer)` matching `name_or_path`; `d_in`, when given, is
    the width every hook point must have.
    """
    roots = [Path(t[0]) for t in targets]
    if len({r.resolve() for r in roots}) != len(roots):
        raise ValueError(f"two hook points share a cache directory: {[str(r) for r in roots]}")
    text_source = dict(text_files=None if text_files is None else [str(f) for f in text_files], dataset=dataset,
                       dataset_config=dataset_config, dataset_split=dataset_split, text_column=text_column,
                       document_separator=resolve_document_separator(document_separator, text_files, dataset))
    base = build_request(name_or_path=name_or_path, gguf_file=gguf_file, revision=revision, lm_dtype=lm_dtype,
                         context_size=context_size, n_tokens=n_tokens, val_fraction=val_fraction,
                         storage_dtype=storage_dtype, prepend_bos=prepend_bos,
                         exclude_special_tokens=exclude_special_tokens, **text_source)  # hashes model and text once
    requests = [{**base, "hook": hook, "layer": None if layer is None else int(layer)} for _, hook, layer in targets]
    built: dict[int, M.Manifest] = {}
    missing = [i for i, root in enumerate(roots) if not (root / C.MANIFEST).is_file()]
    if missing:
        with contextlib.ExitStack() as locks:
            for i in sorted(missing, key=lambda i: str(roots[i].resolve())):  # one order: no deadlock
                locks.enter_context(W.cache_lock(roots[i]))
            missing = [i for i in missing if not (roots[i] / C.MANIFEST).is_file()]  # finished while we waited?
            if missing:
                todo = [_Target(roots[i], requests[i], targets[i][1], targets[i][2]) for i in missing]
                manifests = _build(todo, text_source, name_or_path=name_or_path, gguf_file=gguf_file,
                                   revision=revision, lm_dtype=lm_dtype, n_tokens=n_tokens, context_size=context_size,
                                   val_fraction=val_fraction, storage_dtype=storage_dtype, prepend_bos=prepend_bos,
                                   exclude_special_tokens=exclude_special_tokens, batch_size=batch_size,
                                   shard_mb=shard_mb, device=device, d_in=d_in, progress=progress, lm=lm)
                built = dict(zip(missing, manifests))
    out = []
    for i, root in enumerate(roots):
        if i not in built:
            manifest = M.Manifest.load(root)
            manifest.check_request(requests[i], d_in)
            manifest.verify(checksums=verify_checksums)
            built[i] = manifest
        out.append(built[i])
    return out


@dataclass
class _Target:
    """One cache being harvested: where, for which request and hook point, and its progress."""

    root: Path
    request: dict
    hook: str
    layer: int | None
    state: dict = field(default_factory=dict)
    width: int = 0
    eval_tokens: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)  # per-batch rows (InFlight) of the shard being filled


def _build(targets: list[_Target], text_source: dict, *, name_or_path, gguf_file, revision, lm_dtype, n_tokens,
           context_size, val_fraction, storage_dtype, prepend_bos, exclude_special_tokens, batch_size, shard_mb,
           device, d_in, progress, lm) -> list[M.Manifest]:
    """Harvest into every target's directory (resuming interrupted harvests of the same requests)."""
    dataset, dataset_config = text_source["dataset"], text_source["dataset_config"]
    dataset_split, text_column, text_files = (text_source["dataset_split"], text_source["text_column"],
                                              text_source["text_files"])
    dones = [_resume_state(t.root, t.request) for t in targets]
    for t in targets:  # a process killed mid-write leaves `<file>.tmp`; we hold the lock, so none is being written
        for stale in [*t.root.glob("*.tmp"), *t.root.glob("train/*.tmp"), *t.root.glob("val/*.tmp")]:
            stale.unlink(missing_ok=True)
    started = time.perf_counter()
    model, tokenizer = lm if lm is not None else load_lm(name_or_path, gguf_file, lm_dtype, device, revision)
    device_ = next(model.parameters()).device
    if batch_size is None:
        batch_size = GPU_HARVEST_BATCH if device_.type == "cuda" else CPU_HARVEST_BATCH
    points = [(t.hook, t.layer) for t in targets]
    for hook, layer in points:
        resolve_hook(model, hook, layer)  # fail on a bad hook before tokenising
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_positions is not None and context_size > max_positions:
        raise ValueError(f"context_size {context_size} exceeds the model's {max_positions} positions")

    if dataset is not None:
        documents = iter_hub_documents(dataset, dataset_config, dataset_split, text_column)
    else:
        documents = iter_file_documents(expand_text_files(list(text_files)))
    tokens = tokenize_sequences(tokenizer, documents, context_size, n_tokens, prepend_bos,
                                document_separator=text_source["document_separator"])
    keep = keep_mask(tokens, tokenizer, exclude_special_tokens)
    n_train, n_val = split_sizes(len(tokens), val_fraction)
    if len(tokens) < n_tokens // context_size:
        print(f"[rsae] note: the text gives only {len(tokens) * context_size} tokens (n_tokens={n_tokens})")

    with torch.inference_mode():
        probes = run_to_hooks(model, points, input_ids=tokens[:1].to(device_))
    itemsize = torch.empty((), dtype=C.storage_dtype(storage_dtype)).element_size()
    for t, done, probe in zip(targets, dones, probes):
        if probe.ndim != 3:
            raise ValueError(f"hook {t.hook!r} gives a {probe.ndim}-d activation {tuple(probe.shape)}; expected [batch, seq, d]")
        t.width = probe.shape[-1]
        if d_in is not None and int(d_in) != t.width:
            raise C.CacheMismatchError(f"hook {t.hook!r} at layer {t.layer} has d_in={t.width}, but d_in={d_in} was requested")
        t.state = {"request": t.request,
                   "seqs_per_shard": done.get("seqs_per_shard") or max(1, int(shard_mb * 2**20 / (t.width * itemsize * context_size))),
                   "splits": done.get("splits", {"train": [], "val": []})}
        W.make_dirs(t.root / "train", t.root / "val")
        W.write_sealed_json(t.root / C.PROGRESS, t.state)
        t.eval_tokens = W.write_tensors(t.root / C.EVAL_TOKENS, {"input_ids": tokens[n_train:], "keep": keep[n_train:]})

    ranges = {"train": (0, n_train), "val": (n_train, n_train + n_val)}
    todo = sum(hi - lo for lo, hi in ranges.values()) * context_size
    already = min(sum(_shard_seqs(s) for shards in t.state["splits"].values() for s in shards) for t in targets)
    where = ", ".join(f"{h}@{l}" for h, l in points)
    bar = tqdm(total=todo, initial=already * context_size, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {where}", dynamic_ncols=True)
    store = C.storage_dtype(storage_dtype)
    # Where each target resumes, read before the writer thread starts appending to the records.
    starts = {split: [lo + sum(_shard_seqs(s) for s in t.state["splits"][split]) for t in targets]
              for split, (lo, _) in ranges.items()}
    # This thread runs the forward passes and starts the rows' copies to the host; the writer
    # thread writes each finished shard and its progress record, in order (rsae.data.shard_writer).
    with ShardWriter(SHARD_QUEUE_DEPTH) as writer:
        for split, (lo, hi) in ranges.items():
            # Batches start at every target's shard boundaries (so a batch never spans two shards of
            # any target, and a target alone gets exactly its single harvest's batches).
            nexts = starts[split]
            cuts = sorted({hi, *(b for t in targets for b in range(lo, hi, t.state["seqs_per_shard"]))})
            for first, last in zip(cuts[:-1], cuts[1:]):
                for a in range(first, last, batch_size):
                    b = min(a + batch_size, last)
                    active = [i for i, n in enumerate(nexts) if n <= a]
                    if not active:
                        continue
                    writer.check()  # stop at the writer's first failure
                    rows = _harvest_rows(model, [points[i] for i in active], tokens, keep, a, b, store)
                    bar.update((b - a) * context_size)
                    for i, part in zip(active, rows):
                        t = targets[i]
                        t.pending.append(part)
                        if b == min(nexts[i] + t.state["seqs_per_shard"], hi):  # this target's shard is complete
                            writer.submit(functools.partial(_write_shard, t, split, nexts[i], b, t.pending))
                            t.pending = []
                            nexts[i] = b
    bar.close()
    seconds = round(time.perf_counter() - started, 2)
    return [_finish(t, model, tokenizer, tokens, n_train, n_val, text_source, name_or_path, gguf_file, revision,
                    batch_size, shard_mb, device_, seconds) for t in targets]


def _write_shard(t: _Target, split: str, first: int, last: int, parts: list[InFlight]) -> None:
    """On the writer thread: wait for the parts' copies, check them, write the shard, then record it."""
    batches = [part.rows() for part in parts]
    rows = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    shards = t.state["splits"][split]
    name = f"{split}/{len(shards):05d}.safetensors"
    entry = W.write_shard(t.root / name, rows)
    shards.append({"file": name, **entry, "sequences": [first, last],
                   "norm_sum": float(rows["acts"].float().norm(dim=1).double().sum())})
    W.write_sealed_json(t.root / C.PROGRESS, t.state)


def _finish(t: _Target, model, tokenizer, tokens, n_train, n_val, text_source, name_or_path, gguf_file, revision,
            batch_size, shard_mb, device_, seconds) -> M.Manifest:
    """Write the target's manifest (last: the cache is complete) and drop its progress record."""
    splits = t.state["splits"]
    train_rows = sum(s["rows"] for s in splits["train"])
    if train_rows == 0:
        raise ValueError("no training rows: every position was masked out or the text is too short")
    manifest = {
        "schema_version": C.SCHEMA_VERSION,
        "created": W.now_iso(),
        "request": t.request,
        "d_in": int(t.width),
        "lm": {"name_or_path": str(name_or_path), "gguf_file": gguf_file, "revision": revision,
               "architecture": type(model).__name__, "commit": getattr(model.config, "_commit_hash", None),
               "module": resolve_hook(model, t.hook, t.layer).path},
        "tokenizer": {"sha256": tokenizer_sha256(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                      "vocab_size": len(tokenizer)},
        "text_files": text_source["text_files"] and [str(f) for f in expand_text_files(text_source["text_files"])],
        "tokens": {"sequences": len(tokens), "train_sequences": n_train, "val_sequences": n_val,
                   "positions": len(tokens) * tokens.shape[1]},
        "splits": {split: {"rows": sum(s["rows"] for s in shards), "shards": shards} for split, shards in splits.items()},
        "eval_tokens": {"file": C.EVAL_TOKENS, **t.eval_tokens},
        "stats": {"mean_norm": sum(s["norm_sum"] for s in splits["train"]) / train_rows},
        "args": {"batch_size": batch_size, "shard_mb": shard_mb, "device": str(device_),
                 "seqs_per_shard": t.state["seqs_per_shard"], **text_source},
        "harvest_seconds": seconds,
    }
    manifest = M.Manifest(t.root, W.write_manifest(t.root, manifest))
    manifest.record_hashed()  # each sha256 was taken from the bytes written: reusing runs need not hash them
    (t.root / C.PROGRESS).unlink(missing_ok=True)
    return manifest


def _shard_seqs(entry: dict) -> int:
    return entry["sequences"][1] - entry["sequences"][0]


def _resume_state(root: Path, request: dict) -> dict:
    """Progress of an interrupted harvest for the same request (shards verified), or {}."""
    path = root / C.PROGRESS
    if not path.is_file():
        return {}
    state = M.read_sealed_json(path)
    splits = state.get("splits")
    if not (isinstance(splits, dict) and all(isinstance(splits.get(s), list) for s in C.SPLITS)
            and isinstance(state.get("seqs_per_shard"), int)):
        raise C.CacheCorruptError(f"{path}: not a harvest progress record; delete it to start the harvest afresh")
    problem = M.describe_mismatch(state.get("request", {}), request)
    if problem:
        raise C.CacheMismatchError(f"unfinished harvest in {root} was for another request ({problem}); "
                                   "use another cache_dir or delete that one")
    for shards in state["splits"].values():
        for shard in shards:
            M.verify_file(root / shard["file"], shard["bytes"], shard["sha256"])
    return state


def _harvest_rows(model, points, tokens, keep, lo, hi, store) -> list[InFlight]:
    """For each hook point: activations at kept positions of sequences [lo, hi) in the storage
    dtype, with their token ids and places. Selection, conversion and (on a GPU) the NaN test
    happen on the model's device; the copy to the host is started, not waited for. The kept rows
    are gathered by indices found on the host, so (unlike a boolean mask on a GPU) nothing waits
    for the forward pass to end."""
    context = tokens.shape[1]
    device = next(model.parameters()).device
    batch, mask = tokens[lo:hi], keep[lo:hi]
    index = mask.reshape(-1).nonzero().squeeze(1)
    with torch.inference_mode():
        outs = run_to_hooks(model, points, input_ids=batch.to(device))
        ids = batch[mask].to(torch.int32)
        seqs = torch.arange(lo, hi, dtype=torch.int32)[:, None].expand(-1, context)[mask]
        positions = torch.arange(context, dtype=torch.int32)[None, :].expand(hi - lo, -1)[mask]
        rows = []
        for (hook, layer), out in zip(points, outs):
            selected = out.reshape(-1, out.shape[-1]).index_select(0, index.to(out.device)).to(store)
            rows.append(InFlight.start(selected, {"tokens": ids, "seq": seqs, "pos": positions},
                                       f"sequences {lo}-{hi - 1} ({hook} at layer {layer})"))
    return rows
