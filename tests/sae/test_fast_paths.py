"""The fast training paths (rsae.sae.fast: encoder without input gradient, exact top-k selection,
sparse decoding, sync-free bookkeeping) compute the same losses, codes, gradients and buffers as
the plain skeleton, for TopK, BatchTopK and JumpReLU, with and without dead latents."""

from __future__ import annotations

import copy

import pytest
import torch

from rsae.sae import fast
from rsae.sae import topk as topk_module
from rsae.sae.mechanisms import topk as auxk_module
from rsae.sae.batchtopk import BatchTopKSAE
from rsae.sae.jumprelu import JumpReLUSAE
from rsae.sae.rational import RationalSAE
from rsae.sae.relu import ReLUSAE
from rsae.sae.topk import TopKSAE

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                reason="needs a CUDA GPU")])]


def make(arch: str, k: int = 2, **kw):
    if arch == "topk":
        return TopKSAE(16, 256, k=k, dead_after_tokens=50, **kw)
    if arch == "batchtopk":
        return BatchTopKSAE(16, 256, k=k, dead_after_tokens=50, **kw)
    if arch == "relu":
        return ReLUSAE(16, 256, dead_after_tokens=50, **kw)
    if arch == "rational":
        return RationalSAE(16, 256, degrees=(5, 4), init_table="relu_5_4", gate="relu", dead_after_tokens=50, **kw)
    return JumpReLUSAE(16, 256, l0_coefficient=0.3, init_threshold=0.05, bandwidth=0.5, **kw)


def force_decoder(monkeypatch, decoder: str) -> None:
    """TopK decodes sparsely ("sparse") or with dense GEMMs ("dense") on every device."""
    ratio = 1 if decoder == "sparse" else 10**9
    monkeypatch.setattr(topk_module, "SPARSE_DECODE_RATIO", {"cuda": ratio, "other": ratio})


def step(sae, x, n_steps: int = 2):
    """Run `n_steps` training outputs (with backward and a plain SGD update) and collect everything."""
    outs = []
    for i in range(n_steps):
        sae.zero_grad(set_to_none=True)
        out = sae.training_output(x[i], step=i)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in sae.named_parameters() if p.grad is not None}
        outs.append({"losses": {k: v.detach().clone() for k, v in out.losses.items()}, "x_hat": out.x_hat.detach().float(),
                     "z": out.z.detach().float(), "grads": grads,
                     "buffers": {n: b.detach().clone() for n, b in sae.named_buffers()}})
        with torch.no_grad():
            for p in sae.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
    return outs


def assert_same(fast_outs, plain_outs, rtol=1e-4, atol=1e-5):
    for f, p in zip(fast_outs, plain_outs):
        assert f["losses"].keys() == p["losses"].keys()
        for k in p["losses"]:
            torch.testing.assert_close(f["losses"][k].float(), p["losses"][k].float(), rtol=rtol, atol=atol, msg=k)
        torch.testing.assert_close(f["x_hat"], p["x_hat"], rtol=rtol, atol=atol)
        torch.testing.assert_close(f["z"], p["z"], rtol=rtol, atol=atol)
        assert f["grads"].keys() == p["grads"].keys()
        for n in p["grads"]:
            torch.testing.assert_close(f["grads"][n], p["grads"][n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
        for n in p["buffers"]:
            torch.testing.assert_close(f["buffers"][n], p["buffers"][n], msg=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,k,dead", [("topk", 2, "none"), ("topk", 2, "some"), ("topk", 2, "few"),
                                         ("topk", 4, "some"), ("batchtopk", 2, "some"), ("batchtopk", 4, "none"),
                                         ("jumprelu", 0, "some"), ("relu", 0, "some"), ("rational", 0, "some")])
def test_fast_path_matches_plain_path(device, arch, k, dead, monkeypatch):
    force_decoder(monkeypatch, "sparse")  # (the dense one: the test above)
    torch.manual_seed(0)
    sae = make(arch, k=k).to(device)
    if dead == "some":  # half the latents dead: more than k_aux (8)
        sae.tokens_since_fired[::2] = 1000
    elif dead == "few":  # 3 dead latents, fewer than k_aux: the top-k_aux reaches -inf entries
        sae.tokens_since_fired[:3] = 1000
    x = torch.randn(2, 40, 16, device=device)
    plain = copy.deepcopy(sae)
    with fast.disabled():
        ref = step(plain, x)
    got = step(sae, x)
    # addmm rounds h differently from (x - b_dec) @ W + b_enc; the rational gate (slope up to ~2)
    # and the step in between carry that last-bit difference a little further.
    # On CUDA, cuBLAS sums the encoder gradient (formed in W_enc's transposed layout) in another
    # order than autograd's product: float32 rounding, up to 2e-5 on entries of ~0.1 where terms cancel.
    # (CUDA, rational: one W_enc gradient entry of 13 differed by 1.1e-3 relative on the H200.)
    tol = {"rtol": 2e-3, "atol": 1e-3} if arch == "rational" else {"rtol": 1e-3, "atol": 1e-4} if device == "cuda" else {}
    assert_same(got, ref, **tol)
    if arch in ("topk", "batchtopk"):
        assert ("aux" in ref[0]["losses"]) and (float(ref[0]["losses"]["aux"]) > 0) == (dead != "none")


def test_sparse_and_dense_decoding_agree(monkeypatch):
    torch.manual_seed(1)
    sae = make("topk", k=2)
    x = torch.randn(2, 30, 16)
    force_decoder(monkeypatch, "sparse")
    sparse = step(copy.deepcopy(sae), x)
    force_decoder(monkeypatch, "dense")
    assert_same(sparse, step(copy.deepcopy(sae), x))


def test_topk_selection_methods_agree(monkeypatch):
    h = torch.randn(50, 512)
    for method in ("torch", "chunked"):
        monkeypatch.setattr(fast, "SELECTION", method)
        values, indices = fast.topk_select(h, 5)
        assert torch.equal(values.sort(-1).values, torch.topk(h, 5).values.sort(-1).values)
        assert torch.equal(h.gather(-1, indices), values)


def test_encoder_without_input_gradient_matches_autograd():
    torch.manual_seed(2)
    w, be, bd = (torch.randn(16, 64, requires_grad=True), torch.randn(64, requires_grad=True),
                 torch.randn(16, requires_grad=True))
    x = torch.randn(32, 16, requires_grad=True)
    gy = torch.randn(32, 64)
    ref = torch.autograd.grad(((x - bd) @ w + be), [x, w, be, bd], gy)
    got = torch.autograd.grad(fast.linear_encoder(x, w, be, bd), [x, w, be, bd], gy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Without an input gradient the product with W^T is never formed, and the rest is unchanged.
    got = torch.autograd.grad(fast.linear_encoder(x.detach(), w, be, bd), [w, be, bd], gy)
    for a, b in zip(got, ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stored_transposed", [False, True])
def test_encoder_weight_gradient_comes_in_the_weights_layout_and_dtype(device, stored_transposed):
    """Autograd copies a gradient whose strides differ from its parameter's into the parameter's
    layout (a transposed copy of the whole matrix); the encoder hands it over ready."""
    torch.manual_seed(4)
    w = torch.randn(64, 16, device=device).t() if stored_transposed else torch.randn(16, 64, device=device)
    w = w.requires_grad_()
    x, be, bd = torch.randn(32, 16, device=device), torch.zeros(64, device=device), torch.zeros(16, device=device)
    gy = torch.randn(32, 64, device=device)
    seen = []
    w.register_hook(lambda g: seen.append(g))
    ref = x.t() @ gy
    for dtype in (None, torch.bfloat16):
        seen.clear()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            h = fast.linear_encoder(x, w, be, bd)
        h.backward(gy.to(h.dtype))
        (g,) = seen
        assert g.stride() == w.stride() and g.dtype == torch.float32
        tol = dict(rtol=1e-5, atol=1e-4) if dtype is None else dict(rtol=2e-2, atol=0.15)
        torch.testing.assert_close(g, ref, **tol)
        w.grad = None


def test_encoder_runs_in_the_autocast_dtype():
    w, be, bd = torch.randn(16, 64), torch.randn(64), torch.randn(16)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = fast.linear_encoder(x, w, be, bd)
    assert h.dtype == torch.bfloat16
    ref = (x - bd) @ w + be
    assert float((h.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_fast_path_under_bf16_autocast_tracks_fp32(arch):
    torch.manual_seed(3)
    sae = make(arch)
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = sae.training_output(x).losses["mse"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = sae.training_output(x).losses["mse"]
    assert abs(float(got) - float(ref)) <= 0.05 * float(ref)


def test_batchtopk_threshold_update_is_the_ema_of_batch_minima():
    sae = make("batchtopk")
    sae._update_threshold(torch.tensor([0.0, 0.5, 0.2]))
    assert float(sae.inference_threshold) == pytest.approx(0.2) and bool(sae.threshold_initialised)
    sae._update_threshold(torch.tensor([0.0, 0.0]))  # nothing positive: unchanged
    assert float(sae.inference_threshold) == pytest.approx(0.2)
    sae._update_threshold(torch.tensor([1.2, 3.0]))
    assert float(sae.inference_threshold) == pytest.approx(0.2 + 0.01 * (1.2 - 0.2))


def test_deepcopy_and_pickle_of_a_trained_topk():
    import pickle

    sae = make("topk")
    sae.training_output(torch.randn(20, 16)).loss.backward()
    copy.deepcopy(sae)
    pickle.loads(pickle.dumps(sae))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead,k_aux,capacity", [(5, 8, 128), (100, 8, 128), (100, 128, 128), (200, 64, 256),
                                                   (300, 8, 1024)])
def test_auxk_over_the_dead_columns_matches_the_plain_path(device, arch, n_dead, k_aux, capacity, monkeypatch):
    """With at most `capacity` (< d_sae / 2) latents dead, the fast step computes AuxK from the dead
    latents' own columns (top-k_aux of them, or all where k_aux >= capacity); more, over all."""
    taken = []  # the capacity of each step that took the dead latents' own columns (both step forms)
    columns = auxk_module.dead_columns
    monkeypatch.setattr(auxk_module, "dead_columns", lambda dead, capacity: taken.append(capacity) or columns(dead, capacity))
    torch.manual_seed(1)
    sae = (TopKSAE if arch == "topk" else BatchTopKSAE)(16, 1024, k=2, k_aux=k_aux, dead_after_tokens=50).to(device)
    sae.tokens_since_fired[torch.randperm(1024)[:n_dead]] = 1000
    x = torch.randn(2, 40, 16, device=device)
    plain = copy.deepcopy(sae)
    with fast.disabled():
        ref = step(plain, x)
    got = step(sae, x)
    assert_same(got, ref, **({"rtol": 1e-3, "atol": 1e-4} if device == "cuda" else {}))
    assert float(ref[0]["losses"]["aux"]) > 0
    assert taken == ([] if capacity == 1024 else [capacity] * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch,selection,decode", [("topk", "torch", "dense"), ("topk", "chunked", "dense"),
                                                   ("topk", "triton", "dense"), ("topk", "auto", "dense"),
                                                   ("topk", "torch", "sparse"), ("batchtopk", "auto", "dense"),
                                                   ("batchtopk", "auto", "sparse"), ("jumprelu", "auto", "dense"),
                                                   ("relu", "auto", "dense"), ("rational", "auto", "dense")])
def test_fast_steps_do_not_wait_for_the_gpu(arch, selection, decode, monkeypatch):
    """After the first step (top-k method timing, first dead-latent read) a bf16 training step of the
    fast path makes no host synchronisation, with dead latents present (AuxK on); one case per
    selection method and decoder, so that a failure names the operation."""
    import warnings

    monkeypatch.setattr(fast, "SELECTION", selection)
    force_decoder(monkeypatch, decode)
    torch.manual_seed(0)
    if arch in ("topk", "batchtopk"):
        sae = (TopKSAE if arch == "topk" else BatchTopKSAE)(64, 2048, k=16, dead_after_tokens=50).cuda()
    else:
        sae = {"jumprelu": lambda: JumpReLUSAE(64, 2048, l0_coefficient=0.3), "relu": lambda: ReLUSAE(64, 2048),
               "rational": lambda: RationalSAE(64, 2048, degrees=(5, 4), init_table="relu_5_4", gate="relu")}[arch]().cuda()
    sae.tokens_since_fired[::3] = 1000
    x = torch.randn(3, 512, 64, device="cuda")

    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae.training_output(x[i], step=i)
        out.loss.backward()

    step(0)
    step(1)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            step(2)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    assert not syncs, syncs


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "rational"])
def test_fast_path_in_eval_mode_matches_plain_path(arch):
    torch.manual_seed(4)
    sae = make(arch)
    sae.training_output(torch.randn(40, 16)).loss.backward()  # sets BatchTopK's threshold
    sae.eval()
    x = torch.randn(30, 16)
    with torch.no_grad():
        got = sae.training_output(x)
        with fast.disabled():
            ref = sae.training_output(x)
    torch.testing.assert_close(got.z, ref.z)
    torch.testing.assert_close(got.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    assert got.losses.keys() == ref.losses.keys()
