"""TopK's sparse step, piece by piece, beside the dense GEMMs it replaces (CUDA).

    python -m rsae.bench sparse --shapes 768x24576,2304x65536 --k 32 --batch 4096

For each shape: the encoder GEMM (the unit of comparison), the top-k selection, the entry sort,
each sparse kernel under every tile shape of --tiles (the first is the one in use), the dense
GEMMs each kernel replaces, and one whole TopK training step (forward + backward, bf16 autocast)
sparse and dense, with torch.profiler's kernel table of the sparse one. Times: median of
--repeats CUDA-event timings of --iters calls each, after a warm-up.
"""

from __future__ import annotations

import argparse
import json

import torch

ALT_TILES = {
    "gather_rows": [{"BLOCK_ROWS": 16, "BLOCK_D": 128, "num_warps": 4}, {"BLOCK_ROWS": 8, "BLOCK_D": 128, "num_warps": 4},
                    {"BLOCK_ROWS": 16, "BLOCK_D": 256, "num_warps": 4}],
    "gather_dots": [{"BLOCK_E": 16, "BLOCK_D": 128, "num_warps": 4}, {"BLOCK_E": 32, "BLOCK_D": 128, "num_warps": 4},
                    {"BLOCK_E": 16, "BLOCK_D": 256, "num_warps": 4}],
    "scatter_rows": [{"BLOCK_E": 32, "BLOCK_D": 128, "num_warps": 4}, {"BLOCK_E": 16, "BLOCK_D": 128, "num_warps": 4},
                     {"BLOCK_E": 64, "BLOCK_D": 128, "num_warps": 4}, {"BLOCK_E": 32, "BLOCK_D": 256, "num_warps": 4},
                     {"BLOCK_E": 32, "BLOCK_D": 64, "num_warps": 2}],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rsae.bench sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="768x24576,2304x65536", help="d_in x d_sae, comma-separated")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-tiles", action="store_true", help="time the tile shapes in use only")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def time_ms(fn, iters: int, repeats: int) -> float:
    """Median ms per call of fn over `repeats` runs of `iters` calls, after one warm-up call."""
    from rsae.bench._timing import time_steps

    return time_steps(lambda _batch, _i: fn(), [None], torch.device("cuda"), 1, iters, repeats)["ms"]


def shape_rows(d: int, m: int, k: int, n: int, args) -> dict:
    from rsae.sae import fast, sparse_kernel as sk

    t = lambda fn: time_ms(fn, args.iters, args.repeats)  # noqa: E731
    dev = "cuda"
    x = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    w_enc = torch.randn(d, m, device=dev, dtype=torch.bfloat16) / d**0.5
    w_dec = torch.randn(m, d, device=dev, dtype=torch.bfloat16) / d**0.5
    h = x @ w_enc
    idx = fast.topk_select(h, k)[1]
    vals = h.gather(-1, idx).relu()
    g = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    entries = sk.sort_entries(idx)
    z = torch.zeros_like(h).scatter(-1, idx, vals)
    res = {"encoder GEMM": t(lambda: x @ w_enc), "topk_select": t(lambda: fast.topk_select(h, k)),
           "sort_entries": t(lambda: sk.sort_entries(idx)),
           "dense decode (z @ W_dec)": t(lambda: z @ w_dec), "dense codes grad (g @ W_dec^T)": t(lambda: g @ w_dec.t()),
           "dense weight grad (z^T @ g)": t(lambda: torch.mm(z.t(), g, out_dtype=torch.float32)),
           "one-hot z (zeros + scatter)": t(lambda: torch.zeros_like(h).scatter(-1, idx, vals))}
    calls = {"gather_rows": lambda: sk.gather_rows(vals, idx, w_dec), "gather_dots": lambda: sk.gather_dots(g, idx, w_dec),
             "scatter_rows": lambda: sk.scatter_rows(vals, entries, g, m)}
    for name, fn in calls.items():
        tiles = ALT_TILES[name][:1] if args.no_tiles else ALT_TILES[name]
        keep = dict(sk.TILES[name])
        try:
            for tile in tiles:
                sk.TILES[name] = tile
                res[f"{name} {tile}"] = t(fn)
        finally:
            sk.TILES[name] = keep
    res.update(step_rows(d, m, k, n, args))
    return res


def step_rows(d: int, m: int, k: int, n: int, args) -> dict:
    """One TopK forward + backward, bf16 autocast, sparse and dense; the sparse one's kernel table."""
    from torch.profiler import ProfilerActivity, profile

    from rsae.sae import topk as topk_module
    from rsae.sae.topk import TopKSAE

    sae = TopKSAE(d, m, k=k, dead_after_tokens=10**12).cuda()
    x = torch.randn(n, d, device="cuda")

    def step():
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae.training_output(x)
        out.loss.backward()

    out = {}
    ratio = topk_module.SPARSE_STEP_RATIO
    try:
        for name, r in (("sparse", 1), ("dense", 10**12)):
            topk_module.SPARSE_STEP_RATIO = r
            out[f"step fwd+bwd, {name}"] = time_ms(step, max(3, args.iters // 4), args.repeats)
        topk_module.SPARSE_STEP_RATIO = 1
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    finally:
        topk_module.SPARSE_STEP_RATIO = ratio
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    if not torch.cuda.is_available():
        print("python -m rsae.bench sparse needs a CUDA GPU")
        return 1
    results = {}
    for shape in args.shapes.split(","):
        d, m = (int(v) for v in shape.split("x"))
        rows = shape_rows(d, m, args.k, args.batch, args)
        results[shape] = rows
        print(f"\n### {shape}, k = {args.k}, batch {args.batch} ({torch.cuda.get_device_name()})\n")
        print("| piece | ms |\n|---|---|")
        for name, ms in rows.items():
            print(f"| {name} | {ms:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
