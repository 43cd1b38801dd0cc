"""TopK's sparse step (rsae.sae.sparse_kernel, rsae.sae.sparse_step) against references.

The three kernels against float64 sums on fresh random inputs: float32 and bf16 inputs, a latent
chosen by every row (one long run of sorted entries across many blocks), entry counts and widths
that are not multiples of the tiles. The whole TopK training step with the sparse step against the
plain step: losses, reconstruction, codes, every gradient and the dead-latent counters, over two
steps with an SGD update between them.

On the CPU the kernels run in Triton's interpreter, in a subprocess started with TRITON_INTERPRET=1
(this file run as a script), eagerly and traced by torch.compile; marked `gpu`: the same on CUDA,
plus bf16 autocast and torch.compile at a real shape. Both forms of the step are covered: the
sparse step, and with AuxK on (dead latents) the dense encoder with the sparse decoder.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch


def kernel_errors(device: str, seed: int) -> dict:
    """Largest relative error of each kernel against float64, per input dtype."""
    from rsae.sae import sparse_kernel as sk

    gen = torch.Generator().manual_seed(seed)
    n, k, m, d = 150, 5, 300, 200  # n * k = 750 entries: 12 blocks of 64, the last one partial; d: 2 tiles
    idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)])
    idx[:, 0] = torch.where(torch.arange(n) % 5 == 0, 7, idx[:, 0])  # latent 7: a run over many blocks
    idx[idx[:, 1:].eq(7).any(1), 0] = 299  # (no row holds a latent twice)
    w = torch.randn(m, d, generator=gen)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        v = torch.randn(n, k, generator=gen).to(dtype)
        a = torch.randn(n, d, generator=gen).to(dtype)
        vd, ad, wd = v.double(), a.double(), w.double()
        ref_rows = (vd[:, :, None] * wd[idx]).sum(1)
        ref_dots = (ad[:, None, :] * wd[idx]).sum(-1)
        ref_scatter = torch.zeros(m, d, dtype=torch.float64).index_add_(0, idx.flatten(), vd.flatten()[:, None] * ad.repeat_interleave(k, 0))
        dv, di, dw, da = (t.to(device) for t in (v, idx, w, a))
        got = {
            "gather_rows": (sk.gather_rows(dv, di, dw), ref_rows),
            "gather_dots": (sk.gather_dots(da, di, dw), ref_dots),
            "scatter_rows": (sk.scatter_rows(dv, sk.sort_entries(di), da, m), ref_scatter),
        }
        for name, (res, ref) in got.items():
            assert res.dtype == torch.float32 and res.shape == ref.shape, (name, res.dtype, res.shape)
            out[f"{name}/{str(dtype)[6:]}"] = float((res.double().cpu() - ref).abs().max() / ref.abs().max())
    return out


def step_differences(device: str, seed: int, autocast: bool = False, compiled: bool = False,
                     shape: tuple[int, int, int, int] = (16, 256, 4, 40), reference: str = "plain",
                     steps: int = 2, dead: str | None = None, backend: str = "inductor") -> dict:
    """Largest differences between the sparse step and the `reference` step ("plain": the
    architecture's reference code; "dense": the fast path with dense decoding, which selects from
    the same h) of a TopK SAE over `steps` steps (SGD updates in between), relative to each
    quantity's largest magnitude. With `dead`, AuxK is on: "half" the latents start dead, and the
    sparse run takes the dense encoder with the sparse decoder; a "few" (under 128 of d_sae >= 512)
    start dead, and the sparse step runs with AuxK over the dead latents' own columns."""
    from rsae.sae import fast, sparse_step
    from rsae.sae import topk as topk_module
    from rsae.sae.topk import TopKSAE

    d_in, d_sae, k, rows = shape
    torch.manual_seed(seed)
    # "few": only the latents dead from the start die within the steps (dead_after above their rows)
    dead_after = {"half": 50, "few": 10**6}.get(dead, 10**9)
    sparse_sae = TopKSAE(d_in, d_sae, k=k, dead_after_tokens=dead_after).to(device)
    if dead == "half":
        sparse_sae.tokens_since_fired[::2] = dead_after
    elif dead == "few":
        assert d_sae >= 512
        sparse_sae.tokens_since_fired[::d_sae // 60] = dead_after
    plain_sae = copy.deepcopy(sparse_sae)
    x = torch.randn(steps, rows, d_in, device=device)
    assert sparse_step.applies(x[0])

    def run(sae, mode: str) -> list[dict]:
        fn = torch.compile(sae.training_output, backend=backend) if compiled and mode == "sparse" else sae.training_output
        recs = []
        for i in range(steps):
            sae.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                if mode == "plain":
                    with fast.disabled():
                        out = fn(x[i], i)
                else:  # "dense" never takes the sparse step, "sparse" always
                    ratio = topk_module.SPARSE_STEP_RATIO
                    topk_module.SPARSE_STEP_RATIO = 10**9 if mode == "dense" else 1
                    try:
                        out = fn(x[i], i)
                    finally:
                        topk_module.SPARSE_STEP_RATIO = ratio
                    assert (out.sparse_codes is not None) == (mode == "sparse"), f"{mode}: the wrong step ran"
                    if mode == "sparse" and dead:  # the sparse step (h without gradient) or the dense encoder
                        assert out.h.requires_grad == (dead == "half"), f"{dead}: the wrong step ran"
            out.loss.backward()
            if dead:
                assert float(out.losses["aux"]) > 0, "AuxK did not run"
            recs.append({"mse": out.losses["mse"].detach().float().reshape(1), "x_hat": out.x_hat.detach().float(),
                         **({"aux": out.losses["aux"].detach().float().reshape(1)} if dead else {}),
                         "z": out.z.detach().float(), "l0": out.l0().reshape(1),
                         **{f"grad {n}": p.grad.float() for n, p in sae.named_parameters()},
                         "tokens_since_fired": sae.tokens_since_fired.float()})
            with torch.no_grad():
                for p in sae.parameters():
                    p -= 0.05 * p.grad
        return recs

    got, ref = run(sparse_sae, "sparse"), run(plain_sae, reference)
    out = {}
    for g, r in zip(got, ref):
        for name in r:
            err = float((g[name] - r[name]).abs().max() / r[name].abs().max().clamp_min(1e-12))
            out[name] = max(out.get(name, 0.0), err)
    return out


def check_kernels(errors: dict, seed: int) -> None:
    assert len(errors) == 6, errors
    for name, err in errors.items():
        assert err < 1e-5, f"{name}: relative error {err} (seed {seed})"


def check_step(diffs: dict, seed: int, tol: float) -> None:
    assert {"mse", "x_hat", "z", "grad W_enc", "grad W_dec", "grad b_enc", "grad b_dec"} <= diffs.keys()
    assert diffs["l0"] == 0 and diffs["tokens_since_fired"] == 0, diffs
    for name, err in diffs.items():
        assert err < tol, f"{name}: {err} (seed {seed})"


@pytest.fixture(scope="module")
def interpreted(triton_interpreter):
    return triton_interpreter(__file__, timeout=600)


def test_sparse_kernels_match_float64_interpreted(interpreted):
    seed, results = interpreted
    check_kernels(results["kernels"], seed)


def test_sparse_step_matches_plain_step_interpreted(interpreted):
    seed, results = interpreted
    check_step(results["step"], seed, tol=1e-5)


def test_sparse_decoder_with_auxk_matches_plain_step_interpreted(interpreted):
    seed, results = interpreted
    assert "aux" in results["step_auxk"]
    check_step(results["step_auxk"], seed, tol=1e-5)


def test_sparse_step_with_auxk_over_dead_columns_matches_plain_step_interpreted(interpreted):
    seed, results = interpreted
    assert "aux" in results["step_auxk_few"]
    check_step(results["step_auxk_few"], seed, tol=1e-5)


def test_sparse_step_traced_by_torch_compile_matches_plain_step_interpreted(interpreted):
    seed, results = interpreted
    for name in ("compiled", "compiled_auxk", "compiled_auxk_few"):
        check_step(results[name], seed, tol=1e-5)


def test_sparse_step_is_taken_where_it_applies_and_not_in_deterministic_mode(interpreted):
    assert interpreted[1]["taken"] == [True, False]  # d_sae / k = 1024; then torch.use_deterministic_algorithms


def test_sparse_step_is_not_taken_where_it_does_not_apply():
    from rsae.sae.batchtopk import BatchTopKSAE
    from rsae.sae.topk import TopKSAE

    x = torch.randn(8, 16)
    assert not TopKSAE(16, 256, k=4)._kernels_apply(x)  # CPU without the interpreter: the dense step
    assert TopKSAE(16, 256, k=4).training_output(x).sparse_codes is None
    assert not BatchTopKSAE(16, 256, k=4)._kernels_apply(x)


def test_bad_shapes_are_refused_clearly():
    pytest.importorskip("triton")
    from rsae.sae import sparse_kernel as sk

    with pytest.raises(ValueError, match=r"values and indices \[n, k\]"):
        sk.gather_rows(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long), torch.randn(10, 8))
    with pytest.raises(ValueError, match="g must be"):
        sk.gather_dots(torch.randn(4, 7), torch.zeros(4, 2, dtype=torch.long), torch.randn(10, 8))


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dummy", [pytest.param(0, marks=GPU)])
def test_sparse_kernels_match_float64_on_cuda(dummy):
    seed = int.from_bytes(os.urandom(4), "little")
    check_kernels(kernel_errors("cuda", seed), seed)


@pytest.mark.parametrize("autocast,compiled,shape,tol", [
    pytest.param(False, False, (16, 256, 4, 40), 1e-4, marks=GPU),
    # bf16: both steps round the codes and gradients to bf16 alike but sum in other orders, and the
    # sparse decoder returns x_hat in float32 where the dense GEMM rounds it to bf16. One step: after
    # an update those differences move near-tied pre-activations across the k-th largest.
    pytest.param(True, False, (768, 24576, 32, 4096), 2e-2, marks=GPU),
    pytest.param(True, True, (768, 24576, 32, 4096), 2e-2, marks=GPU),
])
def test_sparse_step_matches_dense_step_on_cuda(autocast, compiled, shape, tol):
    seed = int.from_bytes(os.urandom(4), "little")
    check_step(step_differences("cuda", seed, autocast=autocast, compiled=compiled, shape=shape,
                                reference="dense" if autocast else "plain", steps=1 if autocast else 2), seed, tol)


@pytest.mark.parametrize("dead,compiled", [pytest.param(d, c, marks=GPU) for d in ("half", "few") for c in (False, True)])
def test_sparse_step_with_auxk_matches_plain_step_on_cuda(dead, compiled):
    seed = int.from_bytes(os.urandom(4), "little")
    check_step(step_differences("cuda", seed, compiled=compiled, shape=(64, 2048, 8, 256), dead=dead), seed, 1e-4)


if __name__ == "__main__":  # the interpreter run: one JSON line of results
    seed = int(sys.argv[1])
    from rsae.sae.topk import TopKSAE

    probe, x0 = TopKSAE(16, 4096, k=4), torch.randn(8, 16)
    taken = probe._kernels_apply(x0)
    torch.use_deterministic_algorithms(True)
    taken_deterministic = probe._kernels_apply(x0)
    torch.use_deterministic_algorithms(False)
    print(json.dumps({"kernels": kernel_errors("cpu", seed), "step": step_differences("cpu", seed),
                      "step_auxk": step_differences("cpu", seed, dead="half"),
                      "step_auxk_few": step_differences("cpu", seed, dead="few", shape=(16, 1024, 4, 40)),
                      "taken": [taken, taken_deterministic],
                      # traced by torch.compile (dynamo and AOT autograd; no code generation on the CPU)
                      "compiled": step_differences("cpu", seed, compiled=True, backend="aot_eager"),
                      "compiled_auxk": step_differences("cpu", seed, dead="half", compiled=True, backend="aot_eager"),
                      "compiled_auxk_few": step_differences("cpu", seed, dead="few", shape=(16, 1024, 4, 40),
                                                            compiled=True, backend="aot_eager")}))
