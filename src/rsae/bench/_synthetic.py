"""Synthetic activations for the benchmarks: a generator on the device, batches of it with their
activation scale, and an activation cache in rsae's format (no language model needed) with the
train.py overrides that read it."""

from __future__ import annotations

import math
from pathlib import Path

import torch


class SyntheticActs:
    """Sparse superpositions of random unit features (power-law firing), generated on the device.
    Batch i of a stream is a function of (seed, i)."""

    def __init__(self, d: int, device: torch.device, seed: int = 0, mean_active: float = 32.0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        n_feat = 4 * d
        self.features = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=-1).to(device)
        p = torch.arange(1, n_feat + 1, dtype=torch.float64).pow(-0.5)
        self.probs = (p / p.sum() * mean_active).clamp(max=1.0).float().to(device)
        self.d, self.device, self.seed = d, device, seed

    def batch(self, index: int, batch_size: int, seed: int | None = None) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(((seed if seed is not None else self.seed) * 1_000_003 + index) % 2**62)
        n = self.probs.numel()
        fires = torch.rand(batch_size, n, generator=g, device=self.device) < self.probs
        mags = 0.5 + torch.rand(batch_size, n, generator=g, device=self.device)
        x = (fires * mags) @ self.features
        return x + 0.05 * torch.randn(x.shape, generator=g, device=self.device)


def write_synthetic_cache(root: Path, d: int, n_train: int, n_val: int, device: torch.device, seed: int = 0,
                          context_size: int = 128) -> list[str]:
    """An activation cache in rsae's format (manifest, train/val safetensors shards, eval tokens) holding
    synthetic bf16 activations; returns the ActivationDataModule keyword arguments that accept it
    (the request names a hub id that is never loaded; `data_overrides` turns them into train.py's)."""
    from rsae.data import cache as C
    from rsae.data import cache_write as W
    from rsae.data.harvest import build_request

    root.mkdir(parents=True, exist_ok=True)
    text = root.parent / "synthetic-text.txt"
    text.write_text("synthetic activations for the training benchmark\n")
    n_train = max(context_size, n_train // context_size * context_size)
    n_val = max(context_size, n_val // context_size * context_size)
    args = dict(name_or_path="rsae-bench/synthetic", gguf_file=None, revision=None, lm_dtype="float32",
                hook="resid_post", layer=0, text_files=[str(text)], context_size=context_size,
                n_tokens=n_train + n_val, val_fraction=n_val / (n_train + n_val), storage_dtype="bfloat16",
                prepend_bos=True, exclude_special_tokens=True)
    request = build_request(**args)
    gen = SyntheticActs(d, device, seed)
    rows_per_shard = max(context_size, (64 << 20) // (2 * d) // context_size * context_size)
    splits, norm_sum = {}, 0.0
    for split, total in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(exist_ok=True)
        shards, done, index = [], 0, 0
        while done < total:
            rows = min(rows_per_shard, total - done)
            acts = torch.cat([gen.batch(index * 1000 + j, min(8192, rows - j), seed=seed + (split == "val"))
                              for j in range(0, rows, 8192)]).to(torch.bfloat16).cpu()
            if split == "train":
                norm_sum += float(acts.float().norm(dim=1).double().sum())
            ids = torch.zeros(rows, dtype=torch.int32)
            pos = torch.arange(done, done + rows, dtype=torch.int32)
            name = f"{split}/{index:05d}.safetensors"
            entry = W.write_shard(root / name, {"acts": acts, "tokens": ids, "seq": pos // context_size, "pos": pos % context_size})
            shards.append({"file": name, **entry})
            done, index = done + rows, index + 1
        splits[split] = {"rows": total, "shards": shards}
    n_val_seq = n_val // context_size
    eval_tokens = W.write_tensors(root / C.EVAL_TOKENS, {"input_ids": torch.zeros(n_val_seq, context_size, dtype=torch.long),
                                                         "keep": torch.ones(n_val_seq, context_size, dtype=torch.bool)})
    manifest = {
        "schema_version": C.SCHEMA_VERSION, "created": W.now_iso(), "request": request, "d_in": d,
        "lm": {"name_or_path": args["name_or_path"], "synthetic": True},
        "tokenizer": None, "text_files": args["text_files"],
        "tokens": {"sequences": (n_train + n_val) // context_size, "train_sequences": n_train // context_size,
                   "val_sequences": n_val_seq, "positions": n_train + n_val},
        "splits": splits, "eval_tokens": {"file": C.EVAL_TOKENS, **eval_tokens},
        "stats": {"mean_norm": norm_sum / n_train}, "args": {"synthetic": True, "seed": seed},
    }
    W.write_manifest(root, manifest)
    return {**args, "cache_dir": str(root), "verify_checksums": False}


def data_overrides(kwargs: dict) -> list[str]:
    """train.py `data.*` overrides for ActivationDataModule keyword arguments."""
    def value(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(value(x) for x in v) + "]"
        return repr(v) if isinstance(v, float) else str(v)

    return ["data.dataset=null"] + [f"data.{k}={value(v)}" for k, v in kwargs.items()]


def make_batches(d: int, batch: int, device, seed: int, n: int = 4) -> tuple[list[torch.Tensor], float]:
    gen = SyntheticActs(d, device, seed)
    batches = [gen.batch(i, batch) for i in range(n)]
    scale = float(math.sqrt(d) / torch.cat(batches).norm(dim=-1).mean())
    return batches, scale
