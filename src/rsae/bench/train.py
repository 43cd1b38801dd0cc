"""Training-step benchmark: rsae's step (plain, fast, compiled) beside SAELens, end to end through
train.py on a cached activation stream, and a quality check of the fast path.

    python -m rsae.bench train --arch relu,jumprelu,topk,batchtopk,matryoshka,gated,rational \\
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

import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsae.bench._args import csv, parse_args, parse_shapes
from rsae.bench._models import ARCHS, VARIANTS, ensure_rational_dispatch
from rsae.bench._report import markdown, write_files
from rsae.bench._synthetic import data_overrides, make_batches, write_synthetic_cache
from rsae.bench.e2e import run_e2e
from rsae.bench.quality import quality
from rsae.bench.step import SAELENS_ARCHS, bench_gate, bench_rsae, bench_saelens

PARTS = ("step", "e2e", "quality")


def main(argv: list[str] | None = None, parts=PARTS, prog: str = "python -m rsae.bench train",
         description: str | None = None) -> int:
    """Every part by default; the `step`, `e2e` and `quality` entry points run one (`parts`)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv), prog, description or __doc__)
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
    for part, names in (("e2e", args.e2e), ("quality", args.quality)):
        if tuple(parts) == (part,) and not csv(names):
            raise SystemExit(f"--{part}: name the architectures to run, a comma list of {','.join(ARCHS)}")
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
            write_files(results, args, out_path)

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
    first = [(a, v) for a, v in pairs if v != "fast" and not (v == "plain" and a in ("jumprelu", "batchtopk", "matryoshka"))]
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
                    for dead in [0] + ([int(n) for n in csv(args.dead)] if arch in ("topk", "batchtopk", "matryoshka") else []):
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

    if "step" in parts:
        for d, m in by_size:
            raw_steps(d, m, first, saelens=True)
    if "e2e" in parts:
        end_to_end()
    if "quality" in parts:
        quality_checks()
    if "step" in parts:
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
