"""Training-step benchmark: rsae's step (plain, fast, compiled) beside SAELens, end to end through
train.py on a cached activation stream, and a quality check of the fast path.

    python -m rsae.bench train --arch relu,jumprelu,topk,batchtopk,rational \\
        --shapes 768x24576,2304x65536 --batch 4096 --e2e relu,jumprelu,topk --quality relu,topk,rational
    python -m rsae.bench train --device cpu --shapes 16x64 --batch 32 --steps 2   # smoke run

1. Raw step: one optimisation step as SAEModule runs it, without Lightning: bf16 autocast forward
   (`sae.training_output`), backward, decoder-gradient projection, gradient clipping, fused Adam,
   decoder renormalisation, on synthetic activations already on the device. Variants:
     plain     eager, the architectures' reference code (`rsae.sae.fast.disabled()`), reference
               rational gate (`kernel_disabled()`): the "plain torch bf16 autocast step";
     fast      eager, fast paths on (encoder without input gradient, top-k selection and sparse
               decoding, sync-free bookkeeping, fused Triton rational gate);
     compiled  fast + `SAEModule(compile=True)` (torch.compile of the step and the decoder norm);
     compiled+cg  compiled with `compile_mode=reduce-overhead` (the step replayed as CUDA graphs);
     compiled+graph  compiled with `cuda_graph=True`: forward, backward and clipping captured as
               one CUDA graph (`SAEModule.forward_backward`), then Adam and the decoder norm;
   Reported: ms/step (median of --repeats timed runs of --steps steps, CUDA events), tokens/s,
   TFLOP/s and % of the roofline, counting 12 d m FLOP per token for every architecture (the
   dense step's arithmetic) at --peak-tflops, peak device memory, and the host synchronisations
   in one step (torch.cuda.set_sync_debug_mode).
   SAELens (if importable): `SAETrainer._train_step` of StandardTrainingSAE / TopKTrainingSAE /
   JumpReLUTrainingSAE with its own autocast, clipping and Adam, on the same batches.
2. Rational gate alone, [batch, d_sae] bf16, forward + backward: fused kernel vs the reference.
3. End to end (--e2e): `train.py data=activations` on a synthetic activation cache written in the
   cache format (no language model needed), `trainer=gpu` (bf16-mixed), module.compile as asked,
   logger off, timed by a callback over the steps after the first --e2e-skip (data loading,
   Lightning and logging included). Ratio e2e / raw is against the same architecture and variant.
4. Quality (--quality): --quality-steps steps from the same initialisation on the same synthetic
   stream with the plain and the fast path (and plain again on another data order, which sets
   the noise level); held-out MSE, FVU and L0 must agree within that noise (or 2%).

Writes a Markdown report to stdout and, with --json or $OUT, the full results as JSON (and the
report beside it as .md), both rewritten after every measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lightning as L

ARCHS = ("relu", "jumprelu", "topk", "batchtopk", "rational")
SAELENS_ARCHS = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
VARIANTS = ("plain", "fast", "compiled", "compiled+cg", "compiled+graph")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rsae.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="relu,jumprelu,topk,batchtopk,rational", help="comma list of " + ",".join(ARCHS))
    p.add_argument("--shapes", default="768x24576,2304x65536", help="comma list of d_in x d_sae")
    p.add_argument("--batch", default="4096", help="comma list of batch sizes (tokens per step)")
    p.add_argument("--variants", default="plain,fast,compiled", help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--cg-archs", default="relu,topk,rational",
                   help="architectures measured with compiled+cg (CUDA graphs; at the smallest shape only)")
    p.add_argument("--k", type=int, default=32, help="k of TopK / BatchTopK")
    p.add_argument("--dead", default="", help="comma list of dead-latent counts: TopK / BatchTopK also measured with "
                   "that many latents held dead (AuxK on every step), as rows '<arch> (<n> dead)'")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype of the forward")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matrix rate for the roofline")
    p.add_argument("--profile", default="", help="variants to profile (torch.profiler, 3 steps): kernels by GPU time, "
                   "GPU-busy ms per step; written to <json stem>_profile.md")
    p.add_argument("--no-saelens", action="store_true")
    p.add_argument("--no-gate", action="store_true", help="skip the rational gate microbenchmark")
    p.add_argument("--e2e", default="", help="architectures to run end to end through train.py")
    p.add_argument("--e2e-shapes", default=None, help="shapes for --e2e (default: the largest of --shapes)")
    p.add_argument("--e2e-steps", type=int, default=250)
    p.add_argument("--e2e-skip", type=int, default=50, help="steps before the timed window")
    p.add_argument("--e2e-compile", default="true", choices=("true", "false"))
    p.add_argument("--e2e-workers", type=int, default=2, help="data.num_workers")
    p.add_argument("--e2e-extra-workers", type=int, default=None,
                   help="also run the first --e2e architecture with this many data workers")
    p.add_argument("--e2e-rows", type=int, default=262144, help="training rows in the synthetic cache")
    p.add_argument("--e2e-overrides", default="", help="extra train.py overrides for the end-to-end runs, space "
                   "separated (e.g. 'data.shuffle_device=cuda' with --e2e-workers 0)")
    p.add_argument("--e2e-cuda-graph", default="false",
                   help="module.cuda_graph for the end-to-end runs: a comma list of false/true (false,true: each run twice)")
    p.add_argument("--e2e-timeout", type=int, default=420)
    p.add_argument("--e2e-profile-steps", type=int, default=0,
                   help="profile this many steps before the timed window (host and GPU time by operation)")
    p.add_argument("--e2e-sync-steps", type=int, default=3,
                   help="count host synchronisations (and where they happen) over this many steps before the timed window")
    p.add_argument("--quality", default="", help="architectures for the quality check")
    p.add_argument("--quality-shape", default=None, help="default: the smallest of --shapes")
    p.add_argument("--quality-steps", type=int, default=200)
    p.add_argument("--quality-batch", type=int, default=None, help="default: the first --batch")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: start nothing new after this")
    p.add_argument("--work-dir", default=None, help="for the cache and train.py runs (default: a temporary dir)")
    p.add_argument("--json", default=None, help="results file (default: $OUT/train_bench.json when $OUT is set)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        d, m = item.lower().split("x")
        out.append((int(d), int(m)))
    return out


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# --- synthetic activations ---------------------------------------------------------------------------


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
            entry = C.write_shard(root / name, {"acts": acts, "tokens": ids, "seq": pos // context_size, "pos": pos % context_size})
            shards.append({"file": name, **entry})
            done, index = done + rows, index + 1
        splits[split] = {"rows": total, "shards": shards}
    n_val_seq = n_val // context_size
    eval_tokens = C.write_tensors(root / C.EVAL_TOKENS, {"input_ids": torch.zeros(n_val_seq, context_size, dtype=torch.long),
                                                         "keep": torch.ones(n_val_seq, context_size, dtype=torch.bool)})
    manifest = {
        "schema_version": C.SCHEMA_VERSION, "created": C.now_iso(), "request": request, "d_in": d,
        "lm": {"name_or_path": args["name_or_path"], "synthetic": True},
        "tokenizer": None, "text_files": args["text_files"],
        "tokens": {"sequences": (n_train + n_val) // context_size, "train_sequences": n_train // context_size,
                   "val_sequences": n_val_seq, "positions": n_train + n_val},
        "splits": splits, "eval_tokens": {"file": C.EVAL_TOKENS, **eval_tokens},
        "stats": {"mean_norm": norm_sum / n_train}, "args": {"synthetic": True, "seed": seed},
    }
    C.write_manifest(root, manifest)
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


# --- models -------------------------------------------------------------------------------------------


def build_sae(arch: str, d: int, m: int, k: int, seed: int = 0):
    from rsae.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE
    from rsae.sae.rational import RationalSAE

    kw = dict(d_in=d, d_sae=m, init_seed=seed)
    if arch == "relu":
        return ReLUSAE(**kw)
    if arch == "jumprelu":
        return JumpReLUSAE(**kw, l0_coefficient=0.002)
    if arch == "topk":
        return TopKSAE(**kw, k=k)
    if arch == "batchtopk":
        return BatchTopKSAE(**kw, k=k)
    if arch == "rational":  # P5/Q4, shared coefficients, per-latent scales, ReLU mask (the sae=rational config)
        return RationalSAE(**kw, degrees=(5, 4), init_table="relu_5_4", gate="relu")
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def ensure_rational_dispatch() -> str:
    """'gate.py' when RationalGate.forward already dispatches to the fused kernel; otherwise install
    that dispatch in this process (same three lines) and say 'bench-patched'."""
    from rsae.rational import gate as G
    from rsae.rational.kernel import rational_gate_triton, use_kernel

    if "rational_gate_triton" in inspect.getsource(G.RationalGate.forward):
        return "gate.py"
    if getattr(G.RationalGate.forward, "_bench_patched", False):
        return "bench-patched"
    reference = G.RationalGate.forward

    def forward(self, h):
        if use_kernel(h):
            return rational_gate_triton(h, self.a, self.b, self.c_in, self.c_out, denominator=self.denominator,
                                        set_index=self.set_index if self.sharing == "group" else None, t_max=self.t_max)
        return reference(self, h)

    forward._bench_patched = True
    G.RationalGate.forward = forward
    return "bench-patched"


@contextlib.contextmanager
def variant_context(variant: str):
    from rsae.rational.kernel import kernel_disabled
    from rsae.sae import fast

    if variant == "plain":
        with fast.disabled(), kernel_disabled():
            yield
    else:
        yield


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- timing -------------------------------------------------------------------------------------------


def time_steps(step, batches, device, warmup: int, steps: int, repeats: int) -> dict:
    """Median ms per step over `repeats` runs of `steps` steps, after `warmup` steps."""
    i = 0
    for _ in range(warmup):
        step(batches[i % len(batches)], i)
        i += 1
    sync(device)
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step(batches[i % len(batches)], i)
                i += 1
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(batches[i % len(batches)], i)
                i += 1
            runs.append((time.perf_counter() - t0) * 1e3 / steps)
    return {"ms": statistics.median(runs), "ms_runs": runs, "next_step": i}


def count_syncs(step, batch, index: int, device: torch.device) -> int | None:
    """Host synchronisations inside one step (CUDA only)."""
    if device.type != "cuda" or not hasattr(torch.cuda, "set_sync_debug_mode"):
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            step(batch, index)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync(device)
    # (the first use of the debug mode also warns that it is a prototype: not a synchronisation)
    return sum("synchroniz" in str(w.message) and "prototype" not in str(w.message) for w in caught)


def profile_steps(step, batches, start: int, device, n: int = 3, rows: int = 18, trace: Path | None = None) -> dict:
    """torch.profiler over `n` steps: the top kernels by GPU time, and the GPU-busy time per step
    (sum of kernel times; against the measured ms/step it shows idle gaps, e.g. a host-bound step).
    With `trace`, also a chrome trace with the operators' input shapes (which call launched a kernel)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=trace is not None) as prof:
        for i in range(n):
            step(batches[i % len(batches)], start + i)
        sync(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    dev_time = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    gpu_us = sum(dev_time(e) for e in events if e.device_type == DeviceType.CUDA)
    table = None
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=rows, max_name_column_width=70)
            break
        except Exception:  # noqa: BLE001 - the sort key's name changed across torch versions
            continue
    return {"gpu_busy_ms_per_step": gpu_us / 1e3 / n, "table": table}


# The step number the timed steps pass: past every warm-up schedule (the coefficients at full value,
# as for most of a run), and constant, so that the compiled step is not recompiled for each new
# step number (the benchmark compiles with static shapes and integers).
BENCH_STEP = 10**6


def rsae_step(module, opt, device, dtype):
    def step(x, i):  # what SAEModule.training_step runs (the same compiled graph)
        with autocast(device, dtype):
            loss = module.run_train(x * module.act_scale, BENCH_STEP)[0]
        loss.backward()
        module.on_before_optimizer_step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.renormalize_decoder()

    return step


def rsae_captured_step(module, opt, device, dtype):
    def step(x, i):  # what SAEModule.training_step runs with cuda_graph=True
        with autocast(device, dtype):
            opt.step(closure=lambda: module.forward_backward(x, BENCH_STEP, opt)[0])
        module.renormalize_decoder()

    return step


def make_batches(d: int, batch: int, device, seed: int, n: int = 4) -> tuple[list[torch.Tensor], float]:
    gen = SyntheticActs(d, device, seed)
    batches = [gen.batch(i, batch) for i in range(n)]
    scale = float(math.sqrt(d) / torch.cat(batches).norm(dim=-1).mean())
    return batches, scale


def flops_per_step(d: int, m: int, batch: int) -> float:
    return 12.0 * d * m * batch


_INITIAL: dict[tuple, object] = {}


def initial_sae(arch: str, d: int, m: int, args, device):
    """A fresh copy of the initial SAE (built on the CPU once per architecture and shape, a slow
    step at d_sae = 65536, then copied on the device for every variant)."""
    key = (arch, d, m, args.k, args.seed, str(device))
    if key not in _INITIAL:
        for old in [k for k in _INITIAL if k[1:3] != (d, m)]:  # one shape at a time on the device
            del _INITIAL[old]
        torch.manual_seed(args.seed)
        _INITIAL[key] = build_sae(arch, d, m, args.k, args.seed).to(device)
    return copy.deepcopy(_INITIAL[key])


def hold_dead(sae, n: int) -> None:
    """n latents, spread over the width, dead now and for good: their count past dead_after_tokens,
    their encoder bias far below any pre-activation (never selected, so never firing)."""
    idx = torch.linspace(0, sae.d_sae - 1, n).round().long().to(sae.b_enc.device)
    with torch.no_grad():
        sae.b_enc[idx] = -1e4
        sae.tokens_since_fired[idx] = sae.dead_after_tokens


def bench_rsae(arch, d, m, batch, variant, args, device, batches, scale, dead: int = 0) -> dict:
    from rsae.lit.module import SAEModule

    sae = initial_sae(arch, d, m, args, device)
    if dead:
        hold_dead(sae, dead)
    module = SAEModule(sae, compile=variant.startswith("compiled"), cuda_graph=variant.endswith("+graph"),
                       compile_mode="reduce-overhead" if variant.endswith("+cg") else None).to(device)
    module.set_activation_scale(scale)
    opt = torch.optim.Adam(sae.parameters(), lr=module.lr, betas=module.betas, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with variant_context(variant):
        step = (rsae_captured_step if module.cuda_graph else rsae_step)(module, opt, device, args.dtype)
        t_compile = time.perf_counter()
        timing = time_steps(step, batches, device, args.warmup, args.steps, args.repeats)
        total = time.perf_counter() - t_compile
        syncs = count_syncs(step, batches[0], timing["next_step"], device)
        trace = Path(args.work_dir) / f"profile-{arch}-{variant}-{d}x{m}.json.gz" if args.work_dir else None
        prof = profile_steps(step, batches, timing["next_step"] + 1, device, trace=trace) if variant in csv(args.profile) else None
    res = {"kind": "rsae", "arch": f"{arch} ({dead} dead)" if dead else arch, "variant": variant, "d": d, "m": m,
           "batch": batch, **timing,
           "syncs_per_step": syncs, "wall_s": round(total, 1)}
    if module.cuda_graph:
        res["graph_captures"] = module._captured.captures
    if prof is not None:
        res["profile"] = prof
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if arch in ("topk", "batchtopk"):
        from rsae.sae import fast

        res["topk_selection"] = {str(k[:3]): v for k, v in fast._choice.items() if k[1] == m}
    del module, sae, opt, step
    return res


def build_saelens(arch: str, d: int, m: int, k: int, device, dtype: str, batch: int):
    import sae_lens as S
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    dev = str(device)
    if arch == "relu":
        sae = S.StandardTrainingSAE(S.StandardTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=5.0, device=dev))
    elif arch == "topk":
        sae = S.TopKTrainingSAE(S.TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device=dev))
    elif arch == "jumprelu":
        sae = S.JumpReLUTrainingSAE(S.JumpReLUTrainingSAEConfig(d_in=d, d_sae=m, l0_coefficient=0.002, device=dev))
    else:
        raise ValueError(arch)
    cfg = SAETrainerConfig(total_training_samples=batch * 10**6, train_batch_size_samples=batch, device=dev,
                           autocast=dtype == "bf16", lr_end=3e-4)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    return sae, trainer


def bench_saelens(arch, d, m, batch, args, device, batches, scale) -> dict:
    import sae_lens

    sae, trainer = build_saelens(arch, d, m, args.k, device, args.dtype, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(x, i):
        trainer._train_step(sae, x * scale)

    timing = time_steps(step, batches, device, args.warmup, args.steps, args.repeats)
    syncs = count_syncs(step, batches[0], timing["next_step"], device)
    res = {"kind": "saelens", "arch": arch, "variant": f"saelens {sae_lens.__version__}", "d": d, "m": m,
           "batch": batch, **timing, "syncs_per_step": syncs}
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del sae, trainer
    return res


def bench_gate(m: int, batch: int, args, device) -> dict:
    """Rational gate forward + backward on [batch, m] bf16: fused kernel vs the reference."""
    from rsae.rational.gate import RationalGate
    from rsae.rational.kernel import kernel_disabled, use_kernel

    gate = RationalGate(m, degrees=(5, 4), init_table="relu_5_4", scale_mode="latent", c_in=4.0).to(device)
    h = (torch.randn(batch, m, device=device) * 3).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    h.requires_grad_(True)
    gy = torch.randn_like(h)

    def run():
        y = gate(h)
        torch.autograd.backward(y, gy)

    out = {"kind": "gate", "m": m, "batch": batch, "dtype": str(h.dtype).removeprefix("torch."),
           "kernel_used": use_kernel(h)}
    if out["kernel_used"]:
        out["kernel_ms"] = time_steps(lambda x, i: run(), [None], device, 3, 10, args.repeats)["ms"]
    with kernel_disabled():
        out["reference_ms"] = time_steps(lambda x, i: run(), [None], device, 2, 5, args.repeats)["ms"]
        if device.type == "cuda":
            compiled = torch.compile(gate.forward)

            def run_compiled():
                torch.autograd.backward(compiled(h), gy)

            out["reference_compiled_ms"] = time_steps(lambda x, i: run_compiled(), [None], device, 3, 10, args.repeats)["ms"]
    # Bytes moved by a perfect fused forward + backward: read h, write y; read h, dy, write dh.
    out["min_bytes"] = 5 * h.numel() * h.element_size()
    return out


# --- end to end ----------------------------------------------------------------------------------------


class StepTimer(L.Callback):
    """Wall time of the training steps after the first `skip`, synchronised at both ends, written as
    JSON to `out` (rank 0) when training ends. The clock stops at the end of the last training
    batch and pauses through validations, so neither counts. With `profile_steps`, torch.profiler
    also records that many steps just before the timed window (host and GPU time by operation,
    GPU-busy ms per step) into `<out stem>_profile.txt`. With `sync_steps`, the host synchronisations of that many steps
    just before the timed window are counted (torch.cuda.set_sync_debug_mode) with the source
    lines that caused them: a sync every step stops the host from running ahead of the GPU."""

    def __init__(self, out: str, skip: int = 50, profile_steps: int = 0, sync_steps: int = 0) -> None:
        self.out, self.skip, self.profile_steps = Path(out), int(skip), int(profile_steps)
        self.sync_steps = int(sync_steps)
        self._sync_start = max(1, self.skip - self.sync_steps - 1)
        self._sync_catch = None
        self.syncs: dict | None = None
        self.paused = 0.0  # seconds of validation inside the timed window (not training: excluded)
        self._val_t0: float | None = None
        self._end: tuple[float, int] | None = None  # (time, step) at the end of the last training batch
        self.t0: float | None = None
        self.step0 = 0
        self.batch_size = None
        self._prof = None
        self._prof_start = max(1, self.skip - self.profile_steps - 2)

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.sync_steps and self.syncs is None and self._sync_catch is None and step == self._sync_start \
                and pl_module.device.type == "cuda":
            import warnings

            self._sync(pl_module)
            self._sync_catch = warnings.catch_warnings(record=True)
            self._sync_records = self._sync_catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
        if self.profile_steps and self._prof is None and step == self._prof_start:
            from torch.profiler import ProfilerActivity, profile

            self._sync(pl_module)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            self._prof.start()
        if self.t0 is None and step >= self.skip:
            self._sync(pl_module)
            self.t0, self.step0 = time.perf_counter(), step
            self.batch_size = int(batch.shape[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is not None and 0 < trainer.max_steps <= trainer.global_step:  # the last step: stop the clock
            self._sync(pl_module)  # before the final validation and teardown
            self._end = (time.perf_counter(), trainer.global_step)
        if self._sync_catch is not None and trainer.global_step == self._sync_start + self.sync_steps:
            torch.cuda.set_sync_debug_mode(0)
            self._sync_catch.__exit__(None, None, None)
            self._sync_catch = None
            found = [r for r in self._sync_records if "synchroniz" in str(r.message)]
            sites: dict[str, int] = {}
            for r in found:
                key = f"{r.filename}:{r.lineno}"
                sites[key] = sites.get(key, 0) + 1
            self.syncs = {"steps": self.sync_steps, "per_step": len(found) / self.sync_steps, "sites": sites}
        if self._prof is not None and trainer.global_step == self._prof_start + self.profile_steps:
            self._sync(pl_module)
            self._prof.stop()
            self._write_trace(self._prof, trainer.global_rank)
            if trainer.global_rank == 0:
                self._write_profile(self._prof)
            self._prof = False  # done

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.t0 is not None and self._end is None:  # a validation inside the timed window
            self._sync(pl_module)
            self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_t0 is not None:
            self._sync(pl_module)
            self.paused += time.perf_counter() - self._val_t0
            self._val_t0 = None

    def trace_path(self, rank: int) -> Path:
        return self.out.with_name(f"{self.out.stem}_trace_rank{rank}.json.gz")

    def _write_trace(self, prof, rank: int) -> None:
        """Every rank's chrome trace (gzipped), for `python -m rsae.bench timeline`."""
        import gzip
        import shutil

        path = self.trace_path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = path.with_suffix("")  # .json
        prof.export_chrome_trace(str(plain))
        with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()

    def _write_profile(self, prof) -> None:
        from torch.autograd import DeviceType

        events = prof.key_averages()
        dev = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
        gpu_ms = sum(dev(e) for e in events if e.device_type == DeviceType.CUDA) / 1e3 / self.profile_steps
        parts = [f"GPU-busy {gpu_ms:.2f} ms per step over {self.profile_steps} profiled steps"]
        if self.trace_path(0).is_file():
            from rsae.bench.timeline import report

            parts.append(report([str(self.trace_path(0))], self.profile_steps))
        for key in ("self_cpu_time_total", "self_device_time_total", "self_cuda_time_total"):
            try:
                parts.append(f"sorted by {key}:\n" + events.table(sort_by=key, row_limit=18, max_name_column_width=70))
            except Exception:  # noqa: BLE001 - sort keys differ across torch versions
                continue
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_name(self.out.stem + "_profile.txt").write_text("\n\n".join(parts) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        if self.t0 is None or trainer.global_rank != 0:  # rank 0 reports (ranks would race on one file)
            return
        end, step = self._end or (time.perf_counter(), trainer.global_step)
        seconds = end - self.t0 - self.paused
        steps = step - self.step0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({
            "steps": steps, "seconds": seconds, "ms": 1e3 * seconds / max(1, steps), "batch": self.batch_size,
            "tokens_per_s": steps * (self.batch_size or 0) / max(seconds, 1e-9),
            "peak_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if pl_module.device.type == "cuda" else None,
            "host_syncs": self.syncs, "validation_s_excluded": self.paused,
        }))


def repo_root() -> Path:
    import rsae

    return Path(rsae.__file__).resolve().parents[2]


def run_e2e(arch, d, m, batch, args, device, data_args: list[str], work: Path, workers: int,
            cuda_graph: bool = False) -> dict:
    run_dir = work / f"e2e-{arch}-{d}x{m}-b{batch}-w{workers}{'-graph' if cuda_graph else ''}"
    timer = run_dir / "timer.json"
    cpu = device.type != "cuda"
    overrides = [
        f"sae={arch}", "data=activations", *data_args, f"data.batch_size={batch}",
        f"data.num_workers={workers}", "sae.expansion_factor=null", f"sae.d_sae={m}",
        f"trainer={'cpu' if cpu else 'gpu'}", f"trainer.max_steps={args.e2e_steps}",
        f"trainer.val_check_interval={args.e2e_steps + 1}", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "logger=none", f"module.compile={args.e2e_compile if not cpu else 'false'}",
        "~callbacks.downstream_eval", "~callbacks.model_checkpoint",
        "+callbacks.step_timer._target_=rsae.bench.train.StepTimer", f"+callbacks.step_timer.out={timer}",
        f"+callbacks.step_timer.skip={min(args.e2e_skip, max(0, args.e2e_steps - 2))}",
        f"+callbacks.step_timer.profile_steps={args.e2e_profile_steps if args.e2e_skip >= args.e2e_profile_steps + 8 else 0}",
        f"+callbacks.step_timer.sync_steps={args.e2e_sync_steps if args.e2e_skip >= args.e2e_sync_steps + 2 else 0}",
        f"hydra.run.dir={run_dir}", f"seed={args.seed}", f"module.cuda_graph={str(cuda_graph).lower()}",
        *args.e2e_overrides.split(),
    ]
    if arch in ("topk", "batchtopk"):
        overrides.append(f"sae.k={args.k}")
    if cpu:
        overrides.append("trainer.precision=32-true")
    cmd = [sys.executable, str(repo_root() / "train.py"), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=args.e2e_timeout)
    variant = "compiled" if args.e2e_compile == "true" and not cpu else "fast"
    if cuda_graph:
        variant += "+graph"  # compared with the raw step of the same variant
    res = {"kind": "e2e", "arch": arch, "variant": variant,
           "d": d, "m": m, "batch": batch, "wall_s": round(time.perf_counter() - t0, 1), "returncode": proc.returncode,
           "num_workers": workers, "command": "python train.py " + " ".join(overrides)}
    if proc.returncode != 0 or not timer.is_file():
        res["error"] = (proc.stderr or proc.stdout)[-2000:]
        return res
    res.update(json.loads(timer.read_text()))
    prof = timer.with_name(timer.stem + "_profile.txt")
    if prof.is_file():
        res["profile_text"] = prof.read_text()
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        m_ = json.loads(metrics.read_text())
        res["final"] = {k: m_[k] for k in ("val/mse", "val/fvu", "val/l0") if k in m_}
    return res


# --- quality -------------------------------------------------------------------------------------------


def train_for_quality(arch, d, m, batch, steps, variant, args, device, data_seed) -> dict:
    from rsae.lit.module import SAEModule

    gen = SyntheticActs(d, device, args.seed)
    sample = torch.cat([gen.batch(10**6 + i, batch) for i in range(2)])
    scale = float(math.sqrt(d) / sample.norm(dim=-1).mean())
    torch.manual_seed(args.seed)
    sae = build_sae(arch, d, m, args.k, args.seed).to(device)
    module = SAEModule(sae, compile=variant.startswith("compiled")).to(device)
    module.set_activation_scale(scale)
    opt = torch.optim.Adam(sae.parameters(), lr=module.lr, betas=module.betas, fused=device.type == "cuda")
    with variant_context(variant):
        step = rsae_step(module, opt, device, args.dtype)
        for i in range(steps):
            step(gen.batch(i, batch, seed=data_seed), i)
    sae.eval()
    with torch.no_grad():
        x = torch.cat([gen.batch(2 * 10**6 + i, batch) for i in range(2)]) * scale
        z = sae.encode(x)
        x_hat = sae.decode(z)
        err = (x_hat.float() - x).pow(2).sum(-1)
        mse = float(err.mean()) / scale**2
        fvu = float(err.sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((z != 0).float().sum(-1).mean())
    del module, sae, opt
    return {"mse": mse, "fvu": fvu, "l0": l0}


def quality(arch, d, m, batch, args, device) -> dict:
    steps = args.quality_steps
    plain = train_for_quality(arch, d, m, batch, steps, "plain", args, device, args.seed)
    plain2 = train_for_quality(arch, d, m, batch, steps, "plain", args, device, args.seed + 1)
    fast_ = train_for_quality(arch, d, m, batch, steps, "fast", args, device, args.seed)
    res = {"kind": "quality", "arch": arch, "d": d, "m": m, "batch": batch, "steps": steps,
           "plain": plain, "plain_other_data": plain2, "fast": fast_}
    verdict = True
    for key in ("mse", "l0"):
        noise = abs(plain[key] - plain2[key])
        tol = max(2 * noise, 0.02 * abs(plain[key]), 1e-6)
        res[f"{key}_diff"], res[f"{key}_tol"] = abs(fast_[key] - plain[key]), tol
        verdict &= res[f"{key}_diff"] <= tol
    res["match"] = bool(verdict)
    return res


# --- report --------------------------------------------------------------------------------------------


def fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(results: dict, args) -> str:
    rows = [r for r in results["runs"] if r["kind"] in ("rsae", "saelens") and "ms" in r]
    lines = [f"### Training step ({results['device']}, autocast {args.dtype}, roofline {args.peak_tflops:.0f} TFLOP/s at 12 d m FLOP/token)", ""]
    lines += ["| arch | d x m | batch | variant | ms/step | tokens/s | TFLOP/s | % roofline | peak GiB | syncs/step |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flop = flops_per_step(r["d"], r["m"], r["batch"])
        tflops = flop / (r["ms"] * 1e-3) / 1e12
        roof = flop / (args.peak_tflops * 1e12) * 1e3 / r["ms"] * 100
        lines.append(f"| {r['arch']} | {r['d']}x{r['m']} | {r['batch']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['batch'] / (r['ms'] * 1e-3):,.0f} | {tflops:.0f} | {roof:.0f}% | {fmt(r.get('peak_gib'))} | "
                     f"{fmt(r.get('syncs_per_step'))} |")
    errors = [r for r in results["runs"] if "error" in r]
    gates = [r for r in results["runs"] if r["kind"] == "gate"]
    if gates:
        lines += ["", "### Rational gate alone (P5/Q4, per-latent scales), forward + backward", "",
                  "| batch x d_sae | dtype | fused kernel ms | reference ms | reference compiled ms | kernel GB/s |",
                  "|---|---|---|---|---|---|"]
        for g in gates:
            bw = g["min_bytes"] / (g["kernel_ms"] * 1e-3) / 1e9 if g.get("kernel_ms") else None
            lines.append(f"| {g['batch']}x{g['m']} | {g['dtype']} | {fmt(g.get('kernel_ms'), 3)} | {fmt(g.get('reference_ms'), 3)} | "
                         f"{fmt(g.get('reference_compiled_ms'), 3)} | {fmt(bw, 0)} |")
    e2e = [r for r in results["runs"] if r["kind"] == "e2e"]
    if e2e:
        lines += ["", "### End to end: train.py on a cached activation stream", "",
                  "| arch | d x m | batch | module | data workers | ms/step | tokens/s | % roofline | raw step ms (same variant) | e2e / raw | vs SAELens step | host syncs/step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            if "ms" not in r:
                lines.append(f"| {r['arch']} | {r.get('d')}x{r.get('m')} | {r.get('batch')} | {r.get('variant', '-')} | {r.get('num_workers', '-')} | failed (see JSON) | | | | | | |")
                continue
            raw = find(results, "rsae", r["arch"], r["d"], r["m"], r["batch"], r["variant"])
            sl = find(results, "saelens", r["arch"], r["d"], r["m"], r["batch"])
            roof = flops_per_step(r["d"], r["m"], r["batch"]) / (args.peak_tflops * 1e12) * 1e3 / r["ms"] * 100
            lines.append(f"| {r['arch']} | {r['d']}x{r['m']} | {r['batch']} | {r['variant']} | {r['num_workers']} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} | "
                         f"{roof:.0f}% | {fmt(raw and raw['ms'])} | {fmt(raw and raw['ms'] / r['ms'] * 100, 0)}% | "
                         f"{fmt(sl and sl['ms'] / r['ms'], 2)}x | {fmt((r.get('host_syncs') or {}).get('per_step'), 1)} |")
    qual = [r for r in results["runs"] if r["kind"] == "quality" and "fast" in r]
    if qual:
        lines += ["", "### Quality: fast path vs plain path after the same tokens (held-out synthetic data)", "",
                  "| arch | d x m | steps | MSE plain | MSE plain (other data) | MSE fast | L0 plain | L0 fast | match |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for q in qual:
            lines.append(f"| {q['arch']} | {q['d']}x{q['m']} | {q['steps']} | {q['plain']['mse']:.4g} | {q['plain_other_data']['mse']:.4g} | "
                         f"{q['fast']['mse']:.4g} | {q['plain']['l0']:.1f} | {q['fast']['l0']:.1f} | {'yes' if q['match'] else 'NO'} |")
    summary = targets(results, args)
    if summary:
        lines += ["", "### Targets", ""] + [f"* {s}" for s in summary]
    if errors:
        lines += ["", "### Errors", ""] + [f"* {r['kind']} {r.get('arch', '')} {r.get('variant', '')} "
                                           f"{r.get('d', '')}x{r.get('m', '')}: {r['error'].strip().splitlines()[-1][:200] if r['error'].strip() else '?'}"
                                           for r in errors]
    return "\n".join(lines)


def find(results, kind, arch, d, m, batch, variant=None):
    """The fastest matching run."""
    best = None
    for r in results["runs"]:
        if r["kind"] == kind and r.get("arch") == arch and r.get("d") == d and r.get("m") == m and r.get("batch") == batch \
                and "ms" in r and (variant is None or r.get("variant") == variant):
            if best is None or r["ms"] < best["ms"]:
                best = r
    return best


def targets(results, args) -> list[str]:
    out = []
    shapes = sorted({(r["d"], r["m"], r["batch"]) for r in results["runs"] if r["kind"] == "rsae" and "ms" in r})
    for d, m, b in shapes:
        relu = find(results, "rsae", "relu", d, m, b)
        rat = find(results, "rsae", "rational", d, m, b)
        topk = find(results, "rsae", "topk", d, m, b)
        tag = f"{d}x{m}, batch {b}"
        if relu and rat:
            ratio = rat["ms"] / relu["ms"]
            out.append(f"rational / ReLU step ({tag}, best variants {rat['variant']} / {relu['variant']}): {ratio:.2f}x "
                       f"(target <= 1.15x: {'met' if ratio <= 1.15 else 'NOT met'})")
        if relu and topk:
            ratio = topk["ms"] / relu["ms"]
            out.append(f"TopK / ReLU step ({tag}): {ratio:.2f}x (target <= 1: {'met' if ratio <= 1.0 else 'NOT met'})")
        for arch in ("relu", "jumprelu"):
            mine, sl = find(results, "rsae", arch, d, m, b), find(results, "saelens", arch, d, m, b)
            if mine and sl:
                out.append(f"{arch} raw step vs SAELens ({tag}): {sl['ms'] / mine['ms']:.2f}x faster")
    for r in results["runs"]:
        if r["kind"] != "e2e" or "ms" not in r:
            continue
        tag = f"{r['d']}x{r['m']}, batch {r['batch']}"
        roof = flops_per_step(r["d"], r["m"], r["batch"]) / (args.peak_tflops * 1e12) * 1e3 / r["ms"] * 100
        sl = find(results, "saelens", r["arch"], r["d"], r["m"], r["batch"])
        raw = find(results, "rsae", r["arch"], r["d"], r["m"], r["batch"], r["variant"])
        parts = [f"{roof:.0f}% of roofline"]
        if r["arch"] in ("relu", "jumprelu") and sl:
            parts.append(f"{sl['ms'] / r['ms']:.2f}x SAELens step rate (target >= 2x: {'met' if sl['ms'] / r['ms'] >= 2 else 'NOT met'})")
        if raw:
            frac = raw["ms"] / r["ms"]
            parts.append(f"{frac * 100:.0f}% of the raw {r['variant']} step rate (target >= 85%: {'met' if frac >= 0.85 else 'NOT met'})")
        out.append(f"e2e {r['arch']} ({tag}, {r['num_workers']} data workers): " + "; ".join(parts))
    for q in results["runs"]:
        if q["kind"] == "quality" and "match" in q:
            out.append(f"quality {q['arch']}: fast vs plain MSE / L0 {'match' if q['match'] else 'DIFFER'} within noise")
    return out


# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    out_path = args.json or (os.path.join(os.environ["OUT"], "train_bench.json") if os.environ.get("OUT") else None)
    archs, shapes, batches = csv(args.arch), parse_shapes(args.shapes), [int(b) for b in csv(args.batch)]
    for a in archs + csv(args.e2e) + csv(args.quality):
        if a not in ARCHS:
            raise SystemExit(f"unknown architecture {a!r}; expected one of {ARCHS}")
    variants = csv(args.variants)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; expected one of {VARIANTS}")
    if not csv(args.e2e_cuda_graph) or set(csv(args.e2e_cuda_graph)) - {"false", "true"}:
        raise SystemExit(f"--e2e-cuda-graph: a comma list of false/true, got {args.e2e_cuda_graph!r}")
    if device.type != "cuda":
        variants = [v for v in variants if not v.startswith("compiled")]  # compiling on the CPU takes minutes
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
               "torch": torch.__version__, "args": vars(args), "runs": []}
    try:
        import triton

        results["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        results["triton"] = None
    if "rational" in archs + csv(args.quality):
        results["rational_dispatch"] = ensure_rational_dispatch()
    # Many SAEs of one class (shapes x variants) compile the same training_output: keep them all
    # compiled rather than fall back to eager at the default limit of 8 entries.
    import torch._dynamo as dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
    # Each shape gets its own static graph (as in a real run, which has one shape), rather than a
    # dynamic-shape graph from the second shape on. The step number is a constant (BENCH_STEP):
    # Dynamo guards on an integer argument even where the SAE never reads it.
    dynamo.config.automatic_dynamic_shapes = False

    def over_budget() -> bool:
        return args.time_budget is not None and time.perf_counter() - started > args.time_budget

    def save() -> None:  # after every measurement: a run cut short still leaves its results
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(results, indent=1, default=str))
            Path(out_path).with_suffix(".md").write_text(markdown(results, args) + "\n")
            texts = [f"## {r['arch']} {r['variant']} {r['d']}x{r['m']} batch {r['batch']}: {r['ms']:.2f} ms/step measured, "
                     f"{r['profile']['gpu_busy_ms_per_step']:.2f} ms/step of kernels\n\n```\n{r['profile']['table']}\n```"
                     for r in results["runs"] if r.get("profile")]
            texts += [f"## end to end (train.py) {r['arch']} {r['variant']} {r['d']}x{r['m']} batch {r['batch']}, "
                      f"{r.get('num_workers')} data workers: {r.get('ms', float('nan')):.2f} ms/step measured\n\n```\n{r['profile_text']}\n```"
                      for r in results["runs"] if r.get("profile_text")]
            if texts:
                Path(out_path).with_name(Path(out_path).stem + "_profile.md").write_text("\n\n".join(texts) + "\n")

    def record(fn, *a, **info) -> None:
        if over_budget():
            results["runs"].append({**info, "error": "skipped: time budget exhausted"})
            return
        t0 = time.perf_counter()
        try:
            res = fn(*a)
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the other measurements
            res = {**info, "error": f"{type(exc).__name__}: {exc}"}
        res.setdefault("seconds", round(time.perf_counter() - t0, 1))
        results["runs"].append(res)
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                 if k in ("kind", "arch", "variant", "d", "m", "batch", "ms", "tokens_per_s", "syncs_per_step", "error", "match")}
        print(json.dumps(brief, default=str)[:400], file=sys.stderr, flush=True)
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Order of importance, so that a time budget cuts the least useful part: the raw steps of every
    # shape (largest first), end to end at the largest, the quality check, then the eager fast
    # variants and remaining baselines, the gate alone.
    by_size = sorted(shapes, key=lambda s: -s[0] * s[1])

    pairs = [(a, v) for a in archs for v in variants]
    # First pass: what the targets compare (plain baselines of ReLU / rational / TopK, the compiled
    # steps, SAELens); the eager fast variants and the other plain baselines come last.
    first = [(a, v) for a, v in pairs if v != "fast" and not (v == "plain" and a in ("jumprelu", "batchtopk"))]
    later = [p for p in pairs if p not in first]

    def raw_steps(d, m, todo, saelens: bool):
        for b in batches:
            data, scale = make_batches(d, b, device, args.seed)
            for arch in archs:
                for a, variant in todo:
                    if variant.endswith("+cg") and ((d, m) != by_size[-1] or arch not in csv(args.cg_archs)):
                        continue  # CUDA graphs cut launch overhead, which matters at the small shape
                    if a != arch:
                        continue
                    for dead in [0] + ([int(n) for n in csv(args.dead)] if arch in ("topk", "batchtopk") else []):
                        record(bench_rsae, arch, d, m, b, variant, args, device, data, scale, dead,
                               kind="rsae", arch=f"{arch} ({dead} dead)" if dead else arch, variant=variant,
                               d=d, m=m, batch=b)
                if saelens and not args.no_saelens and arch in SAELENS_ARCHS:
                    try:
                        import sae_lens  # noqa: F401
                    except Exception as exc:  # noqa: BLE001
                        results["runs"].append({"kind": "saelens", "arch": arch, "d": d, "m": m, "batch": b,
                                                "error": f"SAELens not importable: {exc}"})
                    else:
                        record(bench_saelens, arch, d, m, b, args, device, data, scale,
                               kind="saelens", arch=arch, d=d, m=m, batch=b)
            del data

    def end_to_end():
        e2e_archs = csv(args.e2e)
        if not e2e_archs:
            return
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rsae-bench-"))
        for d, m in (parse_shapes(args.e2e_shapes) if args.e2e_shapes else by_size[:1]):
            cache = work / f"cache-d{d}"
            try:
                saved = work / f"cache-d{d}.kwargs.json"
                if not (cache / "manifest.json").is_file() or not saved.is_file():
                    kwargs = write_synthetic_cache(cache, d, args.e2e_rows, max(8192, batches[0]), device, args.seed)
                    saved.write_text(json.dumps(kwargs))
                overrides = data_overrides(json.loads(saved.read_text()))
            except Exception as exc:  # noqa: BLE001
                results["runs"].append({"kind": "e2e", "d": d, "m": m, "error": f"cache: {type(exc).__name__}: {exc}"})
                continue
            runs = [(arch, args.e2e_workers) for arch in e2e_archs]
            if args.e2e_extra_workers is not None and args.e2e_extra_workers != args.e2e_workers:
                runs.append((e2e_archs[0], args.e2e_extra_workers))
            for arch, workers in runs:
                for graph in csv(args.e2e_cuda_graph):
                    record(run_e2e, arch, d, m, batches[0], args, device, overrides, work, workers, graph == "true",
                           kind="e2e", arch=arch, d=d, m=m, batch=batches[0], num_workers=workers)

    def quality_checks():
        q_archs = csv(args.quality)
        if not q_archs:
            return
        d, m = parse_shapes(args.quality_shape)[0] if args.quality_shape else by_size[-1]
        qb = args.quality_batch or batches[0]
        for arch in q_archs:
            record(quality, arch, d, m, qb, args, device, kind="quality", arch=arch, d=d, m=m, batch=qb)

    def gates():
        if args.no_gate or "rational" not in archs:
            return
        for d, m in by_size:
            for b in batches:
                record(bench_gate, m, b, args, device, kind="gate", m=m, batch=b)

    for d, m in by_size:
        raw_steps(d, m, first, saelens=True)
    end_to_end()
    quality_checks()
    for d, m in by_size:
        raw_steps(d, m, later, saelens=False)
    gates()
    save()
    print(markdown(results, args))
    if out_path:
        print(f"\n(results: {out_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
