"""The SAEs the step benchmarks train, and the training step as SAEModule runs it without Lightning."""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch

from rsae.bench._timing import autocast


ARCHS = ("relu", "jumprelu", "topk", "batchtopk", "matryoshka", "gated", "rational")
VARIANTS = ("plain", "fast", "compiled", "compiled+cg", "compiled+graph")


def build_sae(arch: str, d: int, m: int, k: int, seed: int = 0):
    from rsae.sae import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE
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
    if arch == "matryoshka":  # the sae=matryoshka config's groups: 1/16, 1/8, 1/4 and the rest
        return MatryoshkaSAE(**kw, k=k)
    if arch == "gated":
        return GatedSAE(**kw)
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
