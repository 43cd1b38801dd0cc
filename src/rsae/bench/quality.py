"""Quality of the fast path: --quality-steps steps from the same initialisation on the same synthetic
stream with the plain and the fast path (and plain again on another data order, which sets the
noise level); held-out MSE, FVU and L0 must agree within that noise (or 2%).

    python -m rsae.bench quality --quality relu,topk,rational --quality-shape 768x24576

The options are those of `python -m rsae.bench train`; this runs its quality check only.
"""

from __future__ import annotations

import math

import torch

from rsae.bench._models import build_sae, rsae_step, variant_context
from rsae.bench._synthetic import SyntheticActs


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
