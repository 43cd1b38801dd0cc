"""The fused Triton rational gate against the float64 reference (RationalGate), values and every
gradient (h, a, b, C_in, C_out), for every sharing mode, scale mode and denominator.

On the CPU the kernels run in Triton's interpreter, which must be switched on before triton is
first imported: the checks run in one subprocess with TRITON_INTERPRET=1 (this file executed as a
script) and each test reads its case from there. Marked `gpu`: the same checks on CUDA, plus
large bf16 shapes. Inputs are fresh random draws each run (the seed is printed on failure).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

CASES = [  # (name, sharing, scale_mode, denominator, degrees, extra)
    *[(f"{sh}-{sc}-{den}", sh, sc, den, (5, 4), {}) for sh in ("shared", "group", "latent")
      for sc in ("scalar", "latent") for den in ("B", "A")],
    ("deg9_8-latent-B", "latent", "latent", "B", (9, 8), {}),
    ("deg3_2-group-A", "group", "scalar", "A", (3, 2), {}),
    ("deg2_0-shared", "shared", "latent", "B", (2, 0), {}),
    ("deg1_3-group-B", "group", "latent", "B", (1, 3), {}),
    ("tmax2-shared-B", "shared", "latent", "B", (5, 4), {"t_max": 2.0}),
    ("tmax2-latent-A", "latent", "scalar", "A", (5, 4), {"t_max": 2.0}),
    ("3d-input", "group", "latent", "B", (5, 4), {"shape": (3, 5)}),
    ("no-input-grad", "latent", "latent", "B", (5, 4), {"h_grad": False}),
    ("frozen-gate", "group", "latent", "A", (5, 4), {"param_grad": False}),
    ("many-rows", "shared", "latent", "B", (5, 4), {"rows": 300, "d": 70}),
    ("relu-mask-latent-B", "latent", "latent", "B", (5, 4), {"positive_only": True}),
    ("relu-mask-group-A", "group", "scalar", "A", (5, 4), {"positive_only": True}),
    ("relu-mask-no-input-grad", "shared", "latent", "B", (5, 4), {"positive_only": True, "h_grad": False}),
    # abs_colsum: the column sums of |phi| too, and a loss reading both (an L1 term through the sums)
    ("abs-sum-relu-mask-latent-B", "latent", "latent", "B", (5, 4), {"positive_only": True, "abs_sum": True}),
    ("abs-sum-shared-A", "shared", "scalar", "A", (5, 4), {"abs_sum": True}),
    ("abs-sum-many-rows-group-B", "group", "latent", "B", (5, 4), {"abs_sum": True, "positive_only": True,
                                                                    "rows": 300, "d": 70}),
    ("abs-sum-3d-no-input-grad", "shared", "latent", "B", (5, 4), {"abs_sum": True, "shape": (3, 50),
                                                                   "h_grad": False}),
]
TOL = 2e-4  # relative L2 error: float32 arithmetic against float64 lands near 1e-6
# ... except where the problem itself is ill-conditioned in float32 (degree-9 polynomials at |t| up
# to 8, near a root of the denominator's |S|, where the gradient moves by 1e-4 when t moves by one
# float32 ulp): there the kernel may be off by a few times what the reference gate computed in
# float32 on the same input is off by (`ref32_*`), or by what the float64 reference moves when the
# input moves by one float32 ulp (`ulp_*`; t = h / C_in itself is rounded in float32), never more.
REF32_FACTOR = 4.0
ULP = 2.0 ** -23


def make_gate(sharing, scale_mode, denominator, degrees, d, t_max, gen):
    from rsae.rational.gate import RationalGate

    gate = RationalGate(d, degrees=degrees, denominator=denominator, sharing=sharing, n_groups=5,
                        scale_mode=scale_mode, t_max=t_max)
    with torch.no_grad():
        for p in (gate.a, gate.b):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        for p in (gate.log_c_in, gate.log_c_out):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return gate


def run_case(name: str, device: str, seed: int) -> dict:
    """Relative errors of the kernel (float32) against the reference gate in float64."""
    from rsae.rational.kernel import rational_gate_triton

    _, sharing, scale_mode, denominator, degrees, extra = next(c for c in CASES if c[0] == name)
    gen = torch.Generator().manual_seed(seed)
    d, rows, t_max = extra.get("d", 37), extra.get("rows", 45), extra.get("t_max", 8.0)
    shape = (*extra.get("shape", (rows,)), d)
    gate = make_gate(sharing, scale_mode, denominator, degrees, d, t_max, gen)
    # Pre-activations spanning [-1, 1] in t, some beyond the clamp, exact zeros and ties.
    h = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.5
    h.view(-1)[:: 11] = 0.0
    h.view(-1)[5:: 13] = 40.0 * torch.randn(h.view(-1)[5:: 13].shape, generator=gen, dtype=torch.float64)
    gy = torch.randn(shape, generator=gen, dtype=torch.float64)
    h_grad, param_grad = extra.get("h_grad", True), extra.get("param_grad", True)
    positive_only, abs_sum = extra.get("positive_only", False), extra.get("abs_sum", False)
    w_sum = torch.randn(d, generator=gen, dtype=torch.float64)  # the sums' weights in the loss

    def loss(out, dev=None):
        """sum(phi * gy), plus sum(w * colsum |phi|) with abs_sum: (phi, the sums or None, loss)."""
        y, sums = out if abs_sum else (out, None)
        value = (y * gy.to(y)).sum()
        return y, sums, value if sums is None else value + (sums * w_sum.to(sums)).sum()

    ref_gate = gate.double()
    names = ["h", "a", "b", "log_c_in", "log_c_out"]
    h64 = h.clone().requires_grad_(h_grad)
    params = [ref_gate.a, ref_gate.b, ref_gate.log_c_in, ref_gate.log_c_out]
    for p in params:
        p.requires_grad_(param_grad)
    y_ref, s_ref, l_ref = loss(ref_gate(h64, positive_only=positive_only, abs_colsum=abs_sum))
    wrt = ([h64] if h_grad else []) + (params if param_grad else [])
    g_ref = torch.autograd.grad(l_ref, wrt, allow_unused=True) if wrt else []

    k_gate = make_gate(sharing, scale_mode, denominator, degrees, d, t_max, torch.Generator()).to(device)
    k_gate.load_state_dict({k: v.float() for k, v in ref_gate.state_dict().items()})
    h32 = h.float().to(device).requires_grad_(h_grad)
    k_params = [k_gate.a, k_gate.b, k_gate.log_c_in, k_gate.log_c_out]
    for p in k_params:
        p.requires_grad_(param_grad)
    y, s_k, l_k = loss(rational_gate_triton(h32, k_gate.a, k_gate.b, k_gate.c_in, k_gate.c_out,
                                            denominator=denominator, t_max=t_max, positive_only=positive_only,
                                            set_index=k_gate.set_index if sharing == "group" else None,
                                            abs_colsum=abs_sum))
    k_wrt = ([h32] if h_grad else []) + (k_params if param_grad else [])
    g_k = torch.autograd.grad(l_k, k_wrt, allow_unused=True) if k_wrt else []

    def rel(x, ref):
        if ref is None or ref.numel() == 0:  # e.g. b of a degree-(p, 0) gate
            return 0.0 if x is None or x.numel() == 0 else float("inf")
        x = x.detach().double().cpu()
        if not torch.isfinite(x).all():
            return float("inf")
        return float((x - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-30))

    out = {"y": rel(y, y_ref), "dtype_ok": y.dtype == torch.float32 and tuple(y.shape) == shape}
    if abs_sum:
        out["y_sums"] = rel(s_k, s_ref)
        out["dtype_ok"] &= s_k.dtype == torch.float32 and tuple(s_k.shape) == (d,)
    wrt_names = ([names[0]] if h_grad else []) + (names[1:] if param_grad else [])
    out.update({f"d_{n}": rel(gk, gr) for n, gk, gr in zip(wrt_names, g_k, g_ref)})

    # The reference gate in float32 on the same input: how well float32 can do here at all.
    r_gate = ref_gate.float()
    h_r = h.float().requires_grad_(h_grad)
    r_params = [r_gate.a, r_gate.b, r_gate.log_c_in, r_gate.log_c_out]
    y_r, s_r, l_r = loss(r_gate(h_r, positive_only=positive_only, abs_colsum=abs_sum))
    r_wrt = ([h_r] if h_grad else []) + (r_params if param_grad else [])
    g_r = torch.autograd.grad(l_r, r_wrt, allow_unused=True) if r_wrt else []
    out["ref32_y"] = rel(y_r, y_ref)
    if abs_sum:
        out["ref32_y_sums"] = rel(s_r, s_ref)
    out.update({f"ref32_d_{n}": rel(gk, gr) for n, gk, gr in zip(wrt_names, g_r, g_ref)})

    # The float64 reference at an input one float32 ulp away: the problem's own conditioning.
    h_u = (h * (1 + ULP)).requires_grad_(h_grad)
    y_u, s_u, l_u = loss(ref_gate(h_u, positive_only=positive_only, abs_colsum=abs_sum))
    g_u = torch.autograd.grad(l_u, ([h_u] if h_grad else []) + (params if param_grad else []),
                              allow_unused=True) if wrt else []
    out["ulp_y"] = rel(y_u, y_ref)
    if abs_sum:
        out["ulp_y_sums"] = rel(s_u, s_ref)
    out.update({f"ulp_d_{n}": rel(gu, gr) for n, gu, gr in zip(wrt_names, g_u, g_ref)})
    out["grads"] = len(g_k)
    return out


def run_edge_cases(device: str, seed: int) -> dict:
    """bf16 / fp16 in and out, NaN / Inf inputs, an empty batch."""
    from rsae.rational.kernel import rational_gate_triton

    gen = torch.Generator().manual_seed(seed)
    gate = make_gate("latent", "latent", "B", (5, 4), 33, 8.0, gen).to(device)
    args = (gate.a, gate.b, gate.c_in, gate.c_out)
    out = {}
    h = (torch.randn(40, 33, generator=gen) * 3).to(device)
    # bf16: the reference computes in float32 too, so the two agree to bf16 rounding of the result.
    hb = h.bfloat16().requires_grad_()
    y = rational_gate_triton(hb, *args)
    ref = gate(hb.detach().float()).detach()
    out["bf16_dtype"] = str(y.dtype)
    out["bf16_err"] = float((y.float() - ref).norm() / ref.norm())
    gy = torch.randn(y.shape, generator=gen).to(device).bfloat16()
    (g_k,) = torch.autograd.grad(y, hb, gy)
    hr = hb.detach().float().requires_grad_()
    (g_r,) = torch.autograd.grad(gate(hr), hr, gy.float())
    out["bf16_grad_err"] = float((g_k.float() - g_r).norm() / g_r.norm())
    # bf16 with abs_colsum: the sums of |phi| as stored (bf16), and the L1 gradient through them.
    w = torch.randn(33, generator=gen).to(device)
    y, sums = rational_gate_triton(hb, *args, positive_only=True, abs_colsum=True)
    (g_k,) = torch.autograd.grad((y.float() * gy.float()).sum() + (sums * w).sum(), hb)
    y_r, sums_r = gate(hr, positive_only=True, abs_colsum=True)  # float32 reference on the same input
    (g_r,) = torch.autograd.grad((y_r * gy.float()).sum() + (sums_r * w).sum(), hr)
    out["bf16_sums_err"] = float((sums - sums_r).norm() / sums_r.norm())
    out["bf16_sums_grad_err"] = float((g_k.float() - g_r).norm() / g_r.norm())
    # NaN stays NaN, +-Inf saturates at the clamp.
    hs = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0] + [1.0] * 29], device=device)
    ys = rational_gate_triton(hs, *args).detach()
    ref_s = gate(hs).detach()
    out["nan_kept"] = bool(torch.isnan(ys[0, 0]))
    out["inf_finite"] = bool(torch.isfinite(ys[0, 1:]).all())
    out["special_err"] = float((ys[0, 1:] - ref_s[0, 1:]).abs().max())
    # fp16: large results clamp to the finite range, never Inf.
    with torch.no_grad():
        gate.log_c_out.fill_(12.0)  # C_out ~ 1.6e5 pushes |phi| past fp16's 65504
    y16 = rational_gate_triton(h.half(), gate.a, gate.b, gate.c_in, gate.c_out)
    out["fp16_finite"] = bool(torch.isfinite(y16).all())
    out["fp16_err"] = float((y16.float() - gate(h.half()).float()).abs().max() / 65504)
    # ... and their sums are those of the clamped values, whose gradient is 0 where clamped
    h16 = h.half().requires_grad_()
    _, s16 = rational_gate_triton(h16, gate.a, gate.b, gate.c_in, gate.c_out, abs_colsum=True)
    _, s16_r = gate(h.half(), abs_colsum=True)
    out["fp16_sums_err"] = float((s16 - s16_r).abs().max() / s16_r.abs().max())
    (g16,) = torch.autograd.grad(s16.sum(), h16)
    clamped = gate(h.half().float()).abs() > 65504 * 1.001  # clamped before the cast (off the border)
    out["fp16_clamped_grad_zero"] = bool(clamped.any()) and float(g16.float()[clamped].abs().max()) == 0.0
    # Empty batch: empty result, zero parameter gradients.
    he = torch.zeros(0, 33, device=device, requires_grad=True)
    ye = rational_gate_triton(he, *args)
    ga = torch.autograd.grad(ye.sum(), gate.a, allow_unused=True)[0]
    out["empty_ok"] = tuple(ye.shape) == (0, 33) and (ga is None or float(ga.abs().sum()) == 0.0)
    ye, se = rational_gate_triton(he, *args, abs_colsum=True)
    ga = torch.autograd.grad(se.sum() + ye.sum(), gate.a, allow_unused=True)[0]
    out["empty_sums_ok"] = (tuple(se.shape) == (33,) and float(se.abs().sum()) == 0.0
                            and (ga is None or float(ga.abs().sum()) == 0.0))
    out.update(run_compiled_check(device, gen))
    return out


def run_compiled_check(device: str, gen: torch.Generator) -> dict:
    """The operator inside torch.compile(fullgraph=True): one graph (a graph break would raise),
    the same values and gradients as the eager call, for the plain and the ReLU-masked gate."""
    from rsae.rational.kernel import rational_gate_triton

    gate = make_gate("group", "latent", "B", (5, 4), 29, 8.0, gen).to(device)
    h = (torch.randn(24, 29, generator=gen) * 3).to(device)
    gy = torch.randn(h.shape, generator=gen).to(device)

    w = torch.randn(29, generator=gen).to(device)

    def step(x, positive_only, abs_colsum):
        out = rational_gate_triton(torch.tanh(x) * 4, gate.a, gate.b, gate.c_in, gate.c_out,
                                   set_index=gate.set_index, positive_only=positive_only, abs_colsum=abs_colsum)
        if abs_colsum:
            return (out[0] * gy).sum() + (out[1] * w).sum()
        return (out * gy).sum()

    out = {}
    for po, ab in ((False, False), (True, False), (True, True)):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        grads = []
        for fn in (step, compiled):
            x = h.clone().requires_grad_()
            loss = fn(x, po, ab)
            grads.append([loss.detach()] + list(torch.autograd.grad(loss, [x, gate.a, gate.b, gate.log_c_in, gate.log_c_out])))
        out[f"compiled_err_{po}{'_sums' if ab else ''}"] = max(float((c - e).abs().max() / e.abs().max().clamp_min(1e-30))
                                                               for e, c in zip(*grads))
    return out


def run_all(device: str, seed: int) -> dict:
    results = {name: run_case(name, device, seed + i) for i, (name, *_) in enumerate(CASES)}
    results["edge"] = run_edge_cases(device, seed)
    return results


def check_case(res: dict, name: str, seed: int) -> None:
    tol = {k: max(TOL, REF32_FACTOR * res.get(f"ref32_{k}", 0.0), REF32_FACTOR * res.get(f"ulp_{k}", 0.0))
           for k in res if k.startswith(("y", "d_"))}
    bad = {k: (res[k], tol[k]) for k in tol if not res[k] <= tol[k]}
    assert res["dtype_ok"], f"{name}: wrong dtype/shape (seed {seed})"
    assert not bad, f"{name}: relative errors above their tolerance (error, tolerance): {bad} (seed {seed})"


def check_edge(res: dict, seed: int) -> None:
    assert res["bf16_dtype"] == "torch.bfloat16"
    assert res["bf16_err"] < 1e-2 and res["bf16_grad_err"] < 2e-2, (res, seed)
    assert res["fp16_finite"] and res["fp16_err"] < 1e-3, (res, seed)
    assert res["nan_kept"] and res["inf_finite"] and res["special_err"] < 1e-4, (res, seed)
    assert res["empty_ok"] and res["empty_sums_ok"], (res, seed)
    assert res["bf16_sums_err"] < 1e-2 and res["bf16_sums_grad_err"] < 2e-2, (res, seed)
    assert res["fp16_sums_err"] < 1e-3 and res["fp16_clamped_grad_zero"], (res, seed)
    assert max(res[k] for k in ("compiled_err_False", "compiled_err_True", "compiled_err_True_sums")) < 1e-5, (res, seed)


# --- CPU: Triton's interpreter in a subprocess ------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(triton_interpreter):
    return triton_interpreter(__file__, TRITON_DEFAULT_FP_FUSION="1")


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kernel_matches_float64_reference_interpreted(interpreted, name):
    seed, results = interpreted
    res = results[name]
    check_case(res, name, seed)
    extra = next(c for c in CASES if c[0] == name)[-1]
    assert res["grads"] == extra.get("h_grad", True) + 4 * extra.get("param_grad", True)


def test_kernel_dtypes_and_special_values_interpreted(interpreted):
    seed, results = interpreted
    check_edge(results["edge"], seed)


def test_use_kernel_is_false_on_cpu_and_when_disabled():
    from rsae.rational.kernel import kernel_disabled, use_kernel

    h = torch.randn(4, 8)
    assert not use_kernel(h)
    assert not use_kernel(h.double())
    with kernel_disabled():
        assert not use_kernel(h)


def test_cpu_tensor_without_interpreter_is_a_clear_error():
    triton = pytest.importorskip("triton")  # noqa: F841
    from rsae.rational import kernel

    if kernel.interpreting():
        pytest.skip("this process runs Triton's interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernel.rational_gate_triton(torch.randn(2, 3), torch.ones(1, 2), torch.ones(1, 1), torch.ones(1), torch.ones(1))


# --- CUDA ------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kernel_matches_float64_reference_cuda(name, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("RSAE_KERNEL_CONFIG", "0,0")  # one tile shape: no autotuning of tiny cases
    seed = int.from_bytes(os.urandom(4), "little")
    check_case(run_case(name, "cuda", seed), name, seed)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("config", range(7))  # every entry of FWD_CONFIGS / BWD_CONFIGS (7 each)
@pytest.mark.parametrize("name", ["group-latent-A", "deg9_8-latent-B", "many-rows", "relu-mask-latent-B"])
def test_every_tile_shape_matches_reference_cuda(name, config, monkeypatch):
    from rsae.rational.kernel_triton import BWD_CONFIGS, FWD_CONFIGS

    pytest.importorskip("triton")
    assert len(FWD_CONFIGS) == len(BWD_CONFIGS) == 7, "update the parametrisation to cover every tile shape"
    monkeypatch.setenv("RSAE_KERNEL_CONFIG", f"{config % len(FWD_CONFIGS)},{config % len(BWD_CONFIGS)}")
    seed = int.from_bytes(os.urandom(4), "little")
    check_case(run_case(name, "cuda", seed), name, seed)


@pytest.mark.gpu
@gpu
def test_kernel_dtypes_and_special_values_cuda(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("RSAE_KERNEL_CONFIG", "0,0")
    seed = int.from_bytes(os.urandom(4), "little")
    check_edge(run_edge_cases("cuda", seed), seed)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("sharing,scale_mode,denominator", [("shared", "latent", "B"), ("group", "scalar", "A"),
                                                            ("latent", "latent", "B")])
def test_kernel_large_bf16_matches_reference_gate_cuda(sharing, scale_mode, denominator):
    """A training-sized bf16 batch: the kernel against the reference gate run on the same bf16
    input (both compute in float32), values and all gradients."""
    from rsae.rational.gate import RationalGate
    from rsae.rational.kernel import rational_gate_triton, use_kernel

    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    d = 24576
    gate = RationalGate(d, degrees=(5, 4), denominator=denominator, sharing=sharing, n_groups=64,
                        scale_mode=scale_mode, init_table="relu_5_4" if denominator == "B" else None, c_in=4.0).cuda()
    if denominator == "A":  # the shipped tables are version-B fits: perturb the identity instead
        with torch.no_grad():
            gate.a.add_(0.1 * torch.randn(gate.a.shape, device="cuda", generator=gen))
            gate.b.add_(0.1 * torch.randn(gate.b.shape, device="cuda", generator=gen))
    h = (torch.randn(2048, d, device="cuda", generator=gen) * 3).bfloat16().requires_grad_()
    assert use_kernel(h)
    gy = torch.randn(h.shape, device="cuda", generator=gen).bfloat16()
    params = [gate.a, gate.b, gate.log_c_in, gate.log_c_out]
    y = rational_gate_triton(h, gate.a, gate.b, gate.c_in, gate.c_out, denominator=denominator,
                             set_index=gate.set_index if sharing == "group" else None, t_max=gate.t_max)
    gk = torch.autograd.grad(y, [h, *params], gy)
    h64 = h.detach().double().requires_grad_()
    gate64 = gate.double()
    y64 = gate64(h64)
    gr = torch.autograd.grad(y64, [h64, *[gate64.a, gate64.b, gate64.log_c_in, gate64.log_c_out]], gy.double())
    assert y.dtype == torch.bfloat16
    assert float((y.double() - y64).norm() / y64.norm()) < 1e-2, seed
    for name, a, b in zip(["h", "a", "b", "c_in", "c_out"], gk, gr):
        assert float((a.double() - b).norm() / b.norm()) < 2e-2, (name, seed)


if __name__ == "__main__":  # the interpreter run of the CPU tests (TRITON_INTERPRET=1 set by the caller)
    torch.set_num_threads(1)
    print(json.dumps(run_all("cpu", int(sys.argv[1]))))
