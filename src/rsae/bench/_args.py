"""The options of the training-step benchmark (`python -m rsae.bench train`, and its parts `step`,
`e2e`, `quality`), and the comma lists they take."""

from __future__ import annotations

import argparse

from rsae.bench._models import ARCHS, VARIANTS


def parse_args(argv: list[str], prog: str, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="relu,jumprelu,topk,batchtopk,matryoshka,gated,rational", help="comma list of " + ",".join(ARCHS))
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
