"""A compiled TopK step must not recompile when AuxK switches on or covers more dead latents: each
recompilation of the step stalls a GPU run for seconds. (Before AuxK ran outside the compiled graph,
the step recompiled at the first dead latent and at each larger AuxK size.)"""

import pytest
import torch
from torch._dynamo.utils import counters

from rsae.lit import SAEModule
from rsae.sae import RationalSAE, TopKSAE


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled code from other tests, and none left for the next ones
    yield
    torch._dynamo.reset()


def _rational_topk(**kw):
    return RationalSAE(gate="topk", l1_coefficient=0.0, **kw)


# The rational SAE with the TopK mask takes AuxK through its mask (a graph break inside it must
# find nothing on the caller's stack that dies between steps, or every step recompiles).
@pytest.mark.parametrize("make", [TopKSAE, _rational_topk], ids=["topk", "rational-topk"])
def test_compiled_topk_step_compiles_once_as_auxk_switches_on_and_grows(fresh_dynamo, make):
    torch.manual_seed(0)
    sae = make(d_in=32, d_sae=2048, k=8, dead_after_tokens=1024)  # AuxK sizes 0, 128, 256, 512
    module = SAEModule(sae=sae, compile=True)
    never = -1e4  # an encoder bias that keeps a latent from ever firing

    def step(i: int) -> dict[str, float]:
        loss, losses, _ = module.run_train(torch.randn(256, 32), i)
        loss.backward()
        return {k: float(v) for k, v in losses.items()}

    with torch.no_grad():
        sae.b_enc[:100] = never  # 100 dead after 4 steps: AuxK over 128 columns
    first = [step(i) for i in range(3)]
    graphs = counters["stats"]["unique_graphs"]
    assert all(s["aux"] == 0 for s in first)
    with torch.no_grad():
        sae.b_enc[100:300] = never  # 300 dead a few steps later: 512 columns
    later = [step(i) for i in range(3, 16)]
    assert later[2]["aux"] > 0  # AuxK switched on ...
    assert 256 < int(sae.dead_mask().sum()) <= 512  # ... and grew past two sizes (AuxK over 512 columns)
    assert counters["stats"]["unique_graphs"] == graphs, "the compiled step recompiled"
