"""The Triton row top-k kernel against torch.topk: the same set of values for every row, k distinct
columns, on fresh random inputs, ties, NaN / -inf rows, rows whose largest entries crowd one chunk,
and the bisection path (a candidate buffer too small on purpose).

On the CPU the kernel runs in Triton's interpreter, in a subprocess started with TRITON_INTERPRET=1
(this file run as a script); marked `gpu`: the same cases on CUDA, plus the real shape through
`fast.topk_select` eagerly and inside torch.compile.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch


def cases(device: str, seed: int) -> list[tuple[str, torch.Tensor, int, int | None]]:
    gen = torch.Generator().manual_seed(seed)
    ties = torch.randint(0, 3, (6, 257), generator=gen).float()
    special = torch.randn(4, 300, generator=gen)
    special[0, :10] = float("nan")
    special[1] = float("-inf")
    special[2, 3:9] = torch.full((6,), float("nan")).neg()  # NaN with the sign bit set: still the largest
    negative = -torch.rand(5, 300, generator=gen) - 1  # every key below zero (the flipped encoding)
    crowded = torch.randn(3, 200, generator=gen) * 0.1
    crowded[:, :40] = torch.arange(40.0) + 100  # the 16 largest all in the first chunks
    out = [
        ("random", torch.randn(9, 300, generator=gen), 5, None),
        ("bf16", torch.randn(5, 1000, generator=gen).bfloat16(), 8, None),
        ("fp16", torch.randn(5, 700, generator=gen).half(), 3, None),
        ("bisection", torch.randn(5, 300, generator=gen), 5, 8),
        ("ties", ties, 6, None),
        ("ties-bisection", ties, 6, 8),
        ("nan-and-inf", special, 5, None),
        ("crowded", crowded, 16, None),
        ("ragged-chunks", torch.randn(4, 333, generator=gen), 7, None),
        ("negative", negative, 5, None),
        ("negative-bisection", negative, 5, 8),
        ("mixed-signs", torch.randn(6, 400, generator=gen) - 3, 6, None),
    ]
    return [(name, h.to(device), k, cap) for name, h, k, cap in out]


def run_all(device: str, seed: int) -> dict:
    from rsae.sae.topk_kernel import row_topk_indices

    results = {}
    for name, h, k, cap in cases(device, seed):
        idx = row_topk_indices(h, k, capacity=cap)
        ref = torch.topk(h.float(), k, dim=-1).values.sort(-1).values
        got = h.float().gather(1, idx).sort(-1).values
        same = torch.equal(torch.nan_to_num(got, nan=1e30), torch.nan_to_num(ref, nan=1e30))
        distinct = all(len(set(row.tolist())) == k for row in idx.cpu())
        results[name] = {"same_values": same, "distinct": distinct, "shape": list(idx.shape),
                         "dtype": str(idx.dtype)}
    return results


def check(results: dict, seed: int) -> None:
    for name, res in results.items():
        assert res["same_values"] and res["distinct"], f"{name}: {res} (seed {seed})"
        assert res["dtype"] == "torch.int64", (name, res)


@pytest.fixture(scope="module")
def interpreted(triton_interpreter):
    return triton_interpreter(__file__)


def test_row_topk_matches_torch_topk_interpreted(interpreted):
    seed, results = interpreted
    assert len(results) == 12
    check(results, seed)


def test_unsupported_shapes_are_refused_clearly():
    pytest.importorskip("triton")
    from rsae.sae.topk_kernel import row_topk_indices, shape_for

    assert shape_for(300, 5) == (16, 19, 512)
    assert shape_for(30, 5) is None and shape_for(10**6, 2000) is None
    with pytest.raises(ValueError, match="rows of at least"):
        row_topk_indices(torch.randn(2, 30), 5)
    with pytest.raises(ValueError, match="power of two"):
        row_topk_indices(torch.randn(2, 300), 5, capacity=12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_topk_matches_torch_topk_on_cuda():
    seed = int.from_bytes(os.urandom(4), "little")
    check(run_all("cuda", seed), seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,k", [((4096, 24576), 32), ((1024, 65536), 64), ((512, 16384), 256)])
def test_topk_select_with_the_kernel_at_real_shapes(shape, k, monkeypatch):
    from rsae.sae import fast

    h = torch.randn(shape, device="cuda").bfloat16()
    h[:, 100:140] = h[:, 100:101]  # ties
    ref = torch.topk(h.float(), k, dim=-1).values.sort(-1).values
    monkeypatch.setattr(fast, "SELECTION", "triton")
    values, idx = fast.topk_select(h, k)
    assert torch.equal(values.float().sort(-1).values, ref)
    assert torch.equal(h.gather(-1, idx), values)
    compiled = torch.compile(lambda x: fast.topk_select(x, k)[1], fullgraph=True)
    assert torch.equal(h.gather(-1, compiled(h)).float().sort(-1).values, ref)


if __name__ == "__main__":  # the interpreter run: one JSON line of results
    print(json.dumps(run_all("cpu", int(sys.argv[1]))))
