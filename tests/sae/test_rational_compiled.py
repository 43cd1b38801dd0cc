"""A compiled rational SAE gives the codes the eager one gives, for every mask, with trainable
gate scales (a training graph). On the CPU, inductor (torch 2.13) turns the gate times a top-k mask
into all-zero codes, which left every latent dead and the loss flat; the TopK mask keeps that
product out of compiled CPU graphs, and this test fails without that (and would pass without it
once inductor compiles the product correctly)."""

import pytest
import torch

from rsae.sae import RationalSAE


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("gate", ["topk", "relu", "jumprelu", "none"])
def test_compiled_codes_equal_eager_codes(fresh_dynamo, gate):
    torch.manual_seed(0)
    sae = RationalSAE(gate=gate, l1_coefficient=0.0, d_in=32, d_sae=512, k=8 if gate == "topk" else None)
    h = sae.pre_acts(torch.randn(64, 32))
    eager = sae.activation(h)
    compiled = torch.compile(sae.activation)(h)
    assert (eager != 0).any()
    torch.testing.assert_close(compiled, eager)
    compiled.pow(2).sum().backward()  # and the compiled graph trains the gate's scales
    assert sae.rational_gate.log_c_out.grad is not None and sae.rational_gate.log_c_out.grad.abs().sum() > 0
