"""The reference rational function and RationalGate: formula, gradients, numerics, layouts."""

import math

import pytest
import torch
from torch.func import functional_call

from rsae.rational import T_MAX, RationalGate, exact_log, rational
from rsae.rational.function import cast_back


def direct(t, a, b, denominator):
    """r(t) written out with explicit powers (no Horner), float64, no clamp."""
    t = t.double()
    a, b = a.double(), b.double()
    num = sum(a[..., i] * t**i for i in range(a.shape[-1]))
    if denominator == "B":
        s = sum((b[..., j - 1] * t**j for j in range(1, b.shape[-1] + 1)), torch.zeros_like(t))
        den = 1 + s.abs()
    else:
        den = 1 + sum((b[..., j - 1].abs() * t.abs() ** j for j in range(1, b.shape[-1] + 1)), torch.zeros_like(t))
    return num / den


@pytest.mark.parametrize("denominator", ["B", "A"])
@pytest.mark.parametrize("degrees", [(3, 2), (5, 4), (9, 8), (2, 3), (4, 0), (0, 2)])
def test_horner_matches_direct_formula(denominator, degrees):
    g = torch.Generator().manual_seed(hash(degrees) % 1000)
    p, q = degrees
    t = torch.rand(200, generator=g, dtype=torch.float64) * 6 - 3
    a, b = torch.randn(p + 1, generator=g, dtype=torch.float64), torch.randn(q, generator=g, dtype=torch.float64)
    got = rational(t, a, b, denominator)
    torch.testing.assert_close(got, direct(t, a, b, denominator), rtol=1e-12, atol=1e-12)


def test_per_position_coefficients_broadcast_over_last_dim():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(7, 5, generator=g, dtype=torch.float64)
    a, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = rational(t, a, b)
    for j in range(5):
        torch.testing.assert_close(got[:, j], direct(t[:, j], a[j], b[j], "B"))
    with pytest.raises(ValueError):
        rational(t, torch.randn(3, 4), torch.randn(3, 3))  # 3 sets do not broadcast over 5


def test_denominator_has_no_pole():
    # Coefficients chosen so that a plain 1 + S(t) would vanish at t = 1 (b_1 = -1).
    t = torch.linspace(-2, 2, 4001, dtype=torch.float64)
    y = rational(t, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64))
    assert torch.isfinite(y).all() and y.abs().max() <= 3.0


@pytest.mark.parametrize("denominator", ["B", "A"])
@pytest.mark.parametrize("degrees", [(3, 2), (9, 8)])
def test_gradcheck_function(denominator, degrees):
    g = torch.Generator().manual_seed(1)
    p, q = degrees
    t = (torch.rand(3, 4, generator=g, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    a = torch.randn(4, p + 1, generator=g, dtype=torch.float64, requires_grad=True)  # per position
    b = torch.randn(4, q, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a, b: rational(t, a, b, denominator), (t, a, b))


@pytest.mark.parametrize("sharing,scale_mode", [("shared", "scalar"), ("shared", "latent"), ("group", "latent"), ("latent", "scalar"), ("latent", "latent")])
@pytest.mark.parametrize("denominator", ["B", "A"])
def test_gradcheck_gate(sharing, scale_mode, denominator):
    """Gradients w.r.t. a, b, C_in, C_out (through their logs) and the input, vs float64 finite
    differences, on fresh random inputs and parameters."""
    torch.manual_seed(2)
    d = 6
    gate = RationalGate(d, degrees=(5, 4), denominator=denominator, sharing=sharing, n_groups=3, scale_mode=scale_mode).double()
    with torch.no_grad():
        for prm in gate.parameters():
            prm.copy_(torch.randn_like(prm) * 0.5)
    h = (torch.randn(4, d, dtype=torch.float64) * 2).requires_grad_()
    names = [n for n, _ in gate.named_parameters()]
    params = tuple(prm.detach().clone().requires_grad_() for prm in gate.parameters())

    def f(h, *ps):
        return functional_call(gate, dict(zip(names, ps)), (h,))

    assert torch.autograd.gradcheck(f, (h, *params))


def test_gate_formula():
    gate = RationalGate(4, init_table="relu_5_4", scale_mode="latent")
    gate.set_scales(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.0, 1.5, 2.0]))
    h = torch.randn(10, 4)
    a, b = gate.coefficients()
    want = gate.c_out * rational(h / gate.c_in, a, b)
    torch.testing.assert_close(gate(h), want)


@pytest.mark.parametrize("degrees", [(3, 2), (9, 8), (16, 15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_no_nan_or_inf_for_huge_and_tiny_inputs(degrees, dtype):
    p, q = degrees
    big = torch.finfo(dtype).max
    t = torch.tensor([0.0, 1e-45, -1e-40, 1e-30, 1e-8, 1.0, -1.0, 7.9, 1e4, -1e4, 1e30, -1e30, big, -big], dtype=torch.float32).to(dtype)
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(p + 1, generator=g) * 2 - 1) * 1e3  # coefficients at the fitting bound
    b = (torch.rand(q, generator=g) * 2 - 1) * 1e3
    for denominator in ("B", "A"):
        y = rational(t, a, b, denominator)
        assert y.dtype == dtype
        assert torch.isfinite(y).all(), (denominator, y)
    gate = RationalGate(t.numel(), degrees=degrees, scale_mode="latent")
    gate.set_coefficients(a, b)
    gate.set_scales(torch.full((t.numel(),), 1e-3), torch.full((t.numel(),), 10.0))
    y = gate(t[None].expand(3, -1))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_huge_inputs_saturate_at_the_clamp():
    a, b = torch.tensor([0.1, 0.5, 1.6, 1.2]), torch.tensor([0.0, 2.4])
    y = rational(torch.tensor([T_MAX, 1e6, 1e30, float("inf"), -T_MAX, -1e30]), a, b)
    assert y[0] == y[1] == y[2] == y[3] and y[4] == y[5]
    assert torch.isnan(rational(torch.tensor([float("nan")]), a, b)).all()  # NaN is not hidden


def test_bf16_autocast_computes_in_fp32():
    torch.manual_seed(4)
    gate = RationalGate(32, init_table="jumprelu_9_8_t0.3", scale_mode="latent")
    w = torch.randn(16, 32)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x @ w
        assert h.dtype == torch.bfloat16
        y = gate(h)
    ref = gate(h.float())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    # Only the final rounding to bf16 differs from the fp32 evaluation of the same bf16 input.
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert all(torch.isfinite(prm.grad).all() for prm in gate.parameters())


def test_fp16_result_is_clamped_not_inf():
    y = cast_back(torch.tensor([1e6, -1e6, float("nan")]), torch.float16)
    assert y[0] == torch.finfo(torch.float16).max and y[1] == -torch.finfo(torch.float16).max and torch.isnan(y[2])


def test_sharing_and_scale_layouts():
    d = 10
    for sharing, n_groups, n_sets in (("shared", 1, 1), ("group", 3, 3), ("latent", 1, d)):
        for scale_mode, n_scales in (("scalar", 1), ("latent", d)):
            gate = RationalGate(d, degrees=(5, 4), sharing=sharing, n_groups=n_groups, scale_mode=scale_mode)
            assert gate.a.shape == (n_sets, 6) and gate.b.shape == (n_sets, 4)
            assert gate.log_c_in.shape == gate.log_c_out.shape == (n_scales,)
            assert gate(torch.randn(3, d)).shape == (3, d)
            assert gate(torch.randn(2, 3, d)).shape == (2, 3, d)
    # group: contiguous blocks of sizes differing by at most one
    gate = RationalGate(10, degrees=(3, 2), sharing="group", n_groups=3)
    assert gate.set_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        RationalGate(4, degrees=(3, 2), sharing="group", n_groups=5)
    with pytest.raises(ValueError):
        RationalGate(4, degrees=(3, 2), init_table="relu_5_4")  # degrees disagree with the table


def test_group_sharing_uses_each_groups_coefficients():
    torch.manual_seed(5)
    gate = RationalGate(6, degrees=(3, 2), sharing="group", n_groups=2, scale_mode="latent")
    with torch.no_grad():
        gate.a.normal_()
        gate.b.normal_()
        gate.log_c_in.normal_(0, 0.3)
    h = torch.randn(5, 6)
    y = gate(h)
    for j in range(6):
        s = j * 2 // 6
        want = gate.c_out[j] * rational(h[:, j] / gate.c_in[j], gate.a[s], gate.b[s])
        torch.testing.assert_close(y[:, j], want)


def test_forward_entries_matches_dense_forward():
    torch.manual_seed(6)
    gate = RationalGate(8, degrees=(5, 4), sharing="latent", scale_mode="latent")
    with torch.no_grad():
        gate.a.normal_()
        gate.b.normal_()
        gate.log_c_in.normal_(0, 0.3)
    h = torch.randn(4, 8)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(8), indexing="ij")
    torch.testing.assert_close(gate.forward_entries(h.flatten(), cols.flatten()), gate(h).flatten())


def test_exact_log_round_trip():
    torch.manual_seed(7)
    c = torch.cat([torch.rand(2000) * 10 + 1e-3, torch.logspace(-20, 20, 500)]).float()
    produced = exact_log(c).exp()  # values exp can produce are hit exactly
    assert torch.equal(exact_log(produced).exp(), produced)
    # exp steps by about |log c| * 2^-23 relative between neighbouring float32 logs
    assert (((produced - c).abs() / c) <= c.log().abs() * 2.0**-23 + 2.0**-23).all()
    with pytest.raises(ValueError):
        exact_log(torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("denominator", ["B", "A"])
def test_identity_initialisation_is_trainable(denominator):
    gate = RationalGate(3, degrees=(2, 2), denominator=denominator)
    h = torch.rand(5, 3) * 2 - 1
    torch.testing.assert_close(gate(h), h, rtol=0, atol=3e-4)
    assert math.isclose(float(gate.c_in.detach()), 1.0)
    (gate(h) - 2 * h).pow(2).sum().backward()
    assert (gate.b.grad != 0).all() and (gate.a.grad != 0).any()  # |.| at 0 would block b
