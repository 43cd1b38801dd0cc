"""One optimisation step as SAEModule runs it, without Lightning (rsae's plain, fast and compiled
variants, and SAELens's `SAETrainer._train_step` on the same batches), and the rational gate alone.

    python -m rsae.bench step --arch relu,topk --shapes 768x24576 --variants plain,compiled

The options are those of `python -m rsae.bench train` (whose --help describes the measurements);
this runs its raw steps and gate only, without the end-to-end runs and the quality check.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rsae.bench._args import csv
from rsae.bench._models import hold_dead, initial_sae, rsae_captured_step, rsae_step, variant_context
from rsae.bench._timing import count_syncs, profile_steps, time_steps


SAELENS_ARCHS = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}


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
    if arch in ("topk", "batchtopk", "matryoshka"):
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
    elif arch == "gated":
        sae = S.GatedTrainingSAE(S.GatedTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=5.0, device=dev))
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
