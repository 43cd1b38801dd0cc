"""SAEModule's speed options: training metrics only on the steps the logger writes (the step's L0
kept on the module every step), and `compile` wiring (the compiled step itself is exercised on CUDA by
`python -m rsae.bench train` and the gpu tests)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rsae.data.synthetic import SyntheticDataModule
from rsae.lit.module import SAEModule
from rsae.sae import TopKSAE
from rsae.sae.base import ConfigError


class Seen(L.Callback):
    def __init__(self) -> None:
        self.keys: list[set[str]] = []
        self.l0: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.append(set(pl_module._metrics_this_step))
        pl_module._metrics_this_step = set()
        self.l0.append(float(pl_module.last_train_l0))


def fit(module: SAEModule, steps: int, log_every: int) -> Seen:
    seen = Seen()
    dm = SyntheticDataModule(d_in=8, n_features=32, batch_size=16)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=log_every,
                        limit_val_batches=0, callbacks=[seen])
    trainer.fit(module, datamodule=dm)
    return seen


def test_metrics_only_on_logged_steps_and_l0_every_step(monkeypatch):
    module = SAEModule(TopKSAE(8, 32, k=2), warmup_steps=0)
    module._metrics_this_step = set()
    original = module.log_dict

    def capture(metrics, *args, **kwargs):
        module._metrics_this_step = set(metrics)
        return original(metrics, *args, **kwargs)

    monkeypatch.setattr(module, "log_dict", capture)
    seen = fit(module, steps=6, log_every=3)
    full = {"train/l0", "train/loss", "train/mse", "train/aux_loss", "train/dead_fraction", "train/lr"}
    assert [k == full for k in seen.keys] == [False, False, True, False, False, True]
    assert [k == set() for k in seen.keys] == [True, True, False, True, True, False]  # nothing logged in between
    assert seen.l0 == [2.0] * 6  # TopK k=2: the step's L0 on the module every step


def test_module_log_every_n_steps_overrides_the_trainer(monkeypatch):
    module = SAEModule(TopKSAE(8, 32, k=2), warmup_steps=0, log_every_n_steps=2)
    module._metrics_this_step = set()
    original = module.log_dict

    def capture(metrics, *args, **kwargs):
        module._metrics_this_step = set(metrics)
        return original(metrics, *args, **kwargs)

    monkeypatch.setattr(module, "log_dict", capture)
    seen = fit(module, steps=4, log_every=50)
    assert ["train/mse" in k for k in seen.keys] == [False, True, False, True]
    with pytest.raises(ConfigError):
        SAEModule(TopKSAE(8, 32, k=2), log_every_n_steps=0)


def test_compile_option_wraps_the_step_functions(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn.__name__) or fn)
    module = SAEModule(TopKSAE(8, 32, k=2), compile=True)
    assert module.step_fn("train") is not None and module.step_fn("normalize_decoder") is not None
    assert calls == ["train_losses", "normalize_decoder"]
    assert module.step_fn("train") is module.step_fn("train")  # compiled once
    plain = SAEModule(TopKSAE(8, 32, k=2))
    assert plain.step_fn("train") == plain.train_losses
    loss, losses, l0 = plain.step_fn("train")(torch.randn(5, 8), 0)
    assert loss.requires_grad and set(losses) == {"mse", "aux"} and float(l0) == 2.0


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping active / inactive
def test_clipping_folded_into_fused_adam_gives_the_same_update(max_norm):
    from rsae.lit.module import clip_gradients

    torch.manual_seed(0)
    params = [torch.randn(20, 7, requires_grad=True), torch.randn(7, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    try:
        opt = torch.optim.Adam(params, lr=0.1, fused=True)
    except RuntimeError:
        pytest.skip("fused Adam is not available on this device")
    opt_ref = torch.optim.Adam(ref, lr=0.1)
    for _ in range(3):
        for group in (params, ref):
            for p in group:
                p.grad = None
            ((group[0] @ group[1]).pow(2).sum() + group[1].sum()).backward()
        clip_gradients(params, max_norm, opt)
        assert opt.grad_scale is not None
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step()
        opt_ref.step()
        for a, b in zip(params, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = torch.optim.Adam(ref, lr=0.1)
    clip_gradients(ref, max_norm, plain)  # not fused: clipped in place
    assert getattr(plain, "grad_scale", None) is None


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_ddp_split_step_puts_encoder_and_decoder_in_different_graphs(arch):
    """The graph break between encoder and decoder (compiled DDP): the encoder's and the decoder's
    weights land in different graphs, and loss and gradients equal the one-graph step's."""
    from rsae.sae import ReLUSAE

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    results = {}
    for split in (False, True):
        torch._dynamo.reset()
        sae = ReLUSAE(8, 32) if arch == "relu" else TopKSAE(8, 32, k=4)
        torch.manual_seed(1)
        for p in sae.parameters():
            p.data.copy_(torch.randn_like(p) * 0.3)
        sae.graph_break_before_decode = split
        graphs = []

        def record(gm, example_inputs, graphs=graphs):
            graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "placeholder"})
            return gm.forward

        loss, _, _ = torch.compile(SAEModule(sae).train_losses, backend=record)(x, 0)
        loss.backward()
        weights = [[i for i, g in enumerate(graphs) if any(name in t for t in g)] for name in ("W_enc", "W_dec")]
        results[split] = (weights, loss.detach(), [p.grad.clone() for p in sae.parameters()])
    assert results[False][0] == [[0], [0]]  # one graph holds both
    (enc,), (dec,) = results[True][0]
    assert enc < dec  # two graphs, encoder first: the decoder's backward (and gradient) comes first
    torch.testing.assert_close(results[True][1], results[False][1])
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b)


def test_compiled_step_under_ddp_asks_the_sae_for_the_split(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for split in (True, False):
            module = SAEModule(TopKSAE(8, 32, k=2), compile=True, ddp_split_step=split)
            module.step_fn("train")
            assert module.sae.graph_break_before_decode is split
        assert SAEModule(TopKSAE(8, 32, k=2)).sae.graph_break_before_decode is False  # eager: never
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "rational"])
def test_compiled_step_takes_the_step_number_as_a_tensor_and_never_recompiles(monkeypatch, arch):
    """The warm-up depends on the step number; compiled, a new number must not recompile (nor,
    with CUDA graphs, re-record), and the losses must equal the eager step's with an int."""
    from torch._dynamo.testing import CompileCounter

    from rsae.sae import JumpReLUSAE, ReLUSAE
    from rsae.sae.rational import RationalSAE

    torch._dynamo.reset()
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter))
    torch.manual_seed(0)
    sae = {"relu": lambda: ReLUSAE(8, 32, l1_coefficient=2.0, l1_warmup_steps=3),
           "jumprelu": lambda: JumpReLUSAE(8, 32, l0_coefficient=0.5, l0_warmup_steps=3),
           "rational": lambda: RationalSAE(8, 32, l1_coefficient=2.0, l1_warmup_steps=3)}[arch]()
    warm = "l1" if arch != "jumprelu" else "l0"
    compiled, eager = SAEModule(sae, compile=True), SAEModule(sae)
    x = torch.randn(16, 8)
    for step in range(6):
        loss, losses, _ = compiled.run_train(x, step)
        want, want_losses, _ = eager.run_train(x, step)
        torch.testing.assert_close(losses[warm], want_losses[warm])
        torch.testing.assert_close(loss, want)
    assert counter.frame_count == 1
