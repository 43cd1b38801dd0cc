"""`module.cuda_graph`: the step up to the optimizer captured as a CUDA graph (rsae.lit.graph_step)
under Lightning's manual optimisation. On the CPU the same manual path runs uncaptured and must
train exactly as the automatic path does; on CUDA the captured replays must match it too."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from rsae.data.synthetic import SyntheticDataModule
from rsae.lit.graph_step import CapturedStep
from rsae.lit.module import SAEModule
from rsae.sae import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE
from rsae.sae.base import ConfigError
from rsae.sae.rational import RationalSAE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])]

SAES = {
    "relu": lambda: ReLUSAE(8, 32, l1_coefficient=0.5, l1_warmup_steps=4),
    "topk": lambda: TopKSAE(8, 32, k=2, dead_after_tokens=40),  # latents die within the run: AuxK matters
    "batchtopk": lambda: BatchTopKSAE(8, 32, k=2),
    "matryoshka": lambda: MatryoshkaSAE(8, 32, k=2, group_sizes=[4, 12, 16], dead_after_tokens=40),  # AuxK too
    "jumprelu": lambda: JumpReLUSAE(8, 32, l0_coefficient=0.1, l0_warmup_steps=4),
    "gated": lambda: GatedSAE(8, 32, l1_coefficient=0.5, l1_warmup_steps=4),
    "rational": lambda: RationalSAE(8, 32, gate="topk", k=3, dead_after_tokens=40),
    # Wide, with 52 latents dead from the start and the rest dying at step 10: AuxK first over the
    # dead latents' own columns (at most 128 of them can be dead), then over all of them.
    "topk-wide": lambda: some_dead(TopKSAE(8, 1024, k=2, dead_after_tokens=150)),
    "rational-wide": lambda: some_dead(RationalSAE(8, 1024, gate="topk", k=3, dead_after_tokens=150)),
}


def some_dead(sae, every: int = 20):
    sae.tokens_since_fired[::every] = 1000
    return sae


class Record(L.Callback):
    def __init__(self) -> None:
        self.l0: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.l0.append(float(pl_module.last_train_l0))


class ChangeCoefficient(L.Callback):
    """Changes a plain SAE setting mid-run, as HoldL0 does every step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 6:
            pl_module.sae.l1_coefficient *= 2.0


def fit(sae, device: str, cuda_graph: bool, steps: int = 12, callbacks=(), precision: str = "32-true",
        batch_size: int = 16, **module_kw):
    torch.manual_seed(0)
    module = SAEModule(copy.deepcopy(sae), warmup_steps=3, decay_fraction=0.5, cuda_graph=cuda_graph, **module_kw)
    record = Record()
    dm = SyntheticDataModule(d_in=sae.d_in, n_features=sae.d_sae, batch_size=batch_size)
    trainer = L.Trainer(max_steps=steps, accelerator=device, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=4, limit_val_batches=0, callbacks=[record, *callbacks])
    trainer.fit(module, datamodule=dm)
    return module, trainer, record


def assert_same_state(got: SAEModule, expected: SAEModule, **tol) -> None:
    for (name, a), (_, b) in zip(expected.state_dict().items(), got.state_dict().items()):
        torch.testing.assert_close(b, a, **tol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(SAES))
def test_captured_step_trains_as_the_automatic_step(arch, device):
    sae = SAES[arch]()
    auto, t_auto, r_auto = fit(sae, device, cuda_graph=False)
    graph, t_graph, r_graph = fit(sae, device, cuda_graph=True)
    assert t_graph.global_step == t_auto.global_step == 12
    assert not graph.automatic_optimization
    # The same operations in the same order; on CUDA the graph replays them. (Wide: AuxK over all
    # columns or over the dead latents' own columns, rounded differently, in different steps: the
    # captured step knows less at first, and the rational SAE's automatic step always takes all.)
    exact = device == "cpu" and not arch.endswith("-wide")
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    assert_same_state(graph, auto, **tol)
    assert r_graph.l0 == pytest.approx(r_auto.l0, rel=1e-4)
    for key in ("train/loss", "train/mse", "train/l0", "train/lr"):
        torch.testing.assert_close(t_graph.callback_metrics[key].cpu(), t_auto.callback_metrics[key].cpu(), **tol)
    # The learning-rate schedule was stepped once per batch, as Lightning does for the automatic path.
    assert t_graph.lr_scheduler_configs[0].scheduler.last_epoch == 12
    if device == "cuda":  # 2 eager warm-up steps, then replays of one graph; with AuxK, one per number of
        # columns it covers (none; the wide ones: all while nothing is known, then 128, then all again)
        assert graph._captured.captures == 1 or (graph.sae.uses_auxk() and graph._captured.captures <= 3)
        assert graph._captured_renorm.captures == 1  # the decoder's renormalisation: a graph of its own
    if graph.sae.uses_auxk():  # AuxK switched on where latents die during the run (dead_after_tokens=40)
        dying = graph.sae.dead_after_tokens <= 12 * 16
        assert (graph.sae._aux_capacity > 0) == dying
        assert (float(t_graph.callback_metrics["train/aux_loss"]) > 0) == dying


@pytest.mark.parametrize("device", DEVICES)
def test_hold_l0_trains_the_same_and_leaves_one_captured_step(device):
    """HoldL0 moves the L1 coefficient every step, in place on the device: the captured step
    reads it there, so one graph serves the whole run, and training matches the automatic path."""
    from rsae.lit.l0_control import HoldL0

    sae = SAES["relu"]()
    auto, _, r_auto = fit(sae, device, cuda_graph=False, steps=14, callbacks=[HoldL0(target_l0=3.0, rate=0.2)])
    graph, _, r_graph = fit(sae, device, cuda_graph=True, steps=14, callbacks=[HoldL0(target_l0=3.0, rate=0.2)])
    coefficient = graph.sae.l1_coefficient
    assert isinstance(coefficient, torch.Tensor) and float(coefficient) != 0.5  # moved away from its start
    torch.testing.assert_close(coefficient, auto.sae.l1_coefficient, rtol=1e-5, atol=0)
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-4, atol=1e-5)
    assert_same_state(graph, auto, **tol)
    if device == "cuda":
        assert graph._captured.captures == 1


@pytest.mark.gpu
@cuda
def test_a_changed_setting_runs_eagerly_then_is_captured_again():
    sae = SAES["relu"]()
    auto, _, _ = fit(sae, "cuda", cuda_graph=False, steps=14, callbacks=[ChangeCoefficient()])
    graph, _, _ = fit(sae, "cuda", cuda_graph=True, steps=14, callbacks=[ChangeCoefficient()])
    assert graph._captured.captures == 2
    assert_same_state(graph, auto, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_captured_step_with_compile_and_bf16():
    sae = ReLUSAE(64, 256, l1_coefficient=0.5)
    run = dict(steps=10, precision="bf16-mixed", batch_size=128, compile=True)
    auto, _, _ = fit(sae, "cuda", cuda_graph=False, **run)
    graph, _, _ = fit(sae, "cuda", cuda_graph=True, **run)
    assert graph._captured.captures == 1
    assert_same_state(graph, auto, rtol=2e-3, atol=2e-4)


@pytest.mark.gpu
@cuda
def test_captured_step_replays_on_new_inputs_and_recaptures_for_a_new_shape():
    w = torch.randn(5, device="cuda")
    calls = []

    def fn(x):
        calls.append(x.shape)
        return (x * w).sum(-1)

    step = CapturedStep(warmup=2)
    for i in range(6):
        x = torch.randn(4, 5, device="cuda")
        torch.testing.assert_close(step(fn, x, key="a"), (x * w).sum(-1))
    assert len(calls) == 3 and step.captures == 1  # 2 eager, 1 capture, then 3 replays
    for i in range(4):  # another shape: eager twice, then captured in its turn
        x = torch.randn(3, 5, device="cuda")
        torch.testing.assert_close(step(fn, x, key="a").clone(), (x * w).sum(-1))
    assert step.captures == 2
    w.mul_(2)  # captured tensors are read where they live: an in-place update is seen by the replay
    x = torch.randn(3, 5, device="cuda")
    torch.testing.assert_close(step(fn, x, key="a"), (x * w).sum(-1))
    n_calls = len(calls)
    x = torch.randn(4, 5, device="cuda")  # the first shape's graph is still there: replayed at once
    torch.testing.assert_close(step(fn, x, key="a"), (x * w).sum(-1))
    assert step.captures == 2 and len(calls) == n_calls
    for i in range(3):  # a third key evicts the least recently used graph (the 3 x 5 one)
        step(fn, torch.randn(2, 5, device="cuda"), key="a")
    assert step.captures == 3 and len(step.graphs) == 2
    assert [k[0] for k in step.graphs] == [(4, 5), (2, 5)]


@pytest.mark.parametrize("device", DEVICES)
def test_dead_latent_bound_never_undercounts(device):
    """The host's bound on how many latents are dead (count >= dead_after): never below the true
    number, exact once every copy has landed, looser as the host counts tokens past the newest
    copy, gone once every latent can be dead; and the `aux_capacities` size it rounds up to."""
    from rsae.sae.fast import DeadLatentBound, aux_capacities, aux_capacity

    assert aux_capacities(1024) == [0, 128, 256] and aux_capacities(256) == [0]
    assert [aux_capacity(n, 1024) for n in (0, 1, 128, 129, 256, 257)] == [0, 128, 128, 256, 256, 1024]
    gen = torch.Generator().manual_seed(3)
    bound, dead_after, n = DeadLatentBound(), 100, 1024
    assert bound.dead_at_most(dead_after) is None and bound.capacity(dead_after, n) == n  # nothing recorded yet
    counts = torch.zeros(n, dtype=torch.long, device=device)
    counts[torch.randperm(n, generator=gen)[:100].to(device)] = 60  # 100 latents not firing for a while
    for step in range(8):
        counts += 10
        fired = torch.rand(n, generator=gen) < (0.9 if step < 4 else 0.99)
        counts[fired.to(device) & (counts < 60)] = 0  # the others fire often
        bound.record(counts, 10, dead_after)
        true_dead = int((counts >= dead_after).sum())
        b = bound.dead_at_most(dead_after)
        assert (b is None or b >= true_dead) and bound.capacity(dead_after, n) >= true_dead, step
    if device == "cuda":
        torch.cuda.synchronize()
    assert true_dead >= 100 and bound.dead_at_most(dead_after) == true_dead  # every copy landed: exact
    assert bound.capacity(dead_after, n) == aux_capacity(true_dead, n) == 128
    bound.tokens += 15  # two more steps' worth counted on the host, not recorded yet
    assert bound.dead_at_most(dead_after) == int((counts >= dead_after - 20).sum())
    bound.tokens += 60  # the host far ahead of the GPU: 8 steps' worth, a looser bound
    assert bound.dead_at_most(dead_after) == int((counts >= dead_after - 80).sum())
    assert bound.dead_at_most(dead_after + 1) is None  # recorded for another dead_after
    bound.tokens += 1000  # every latent can be dead by now
    assert bound.dead_at_most(dead_after) is None and bound.capacity(dead_after, n) == n
    assert copy.deepcopy(bound).dead_at_most(dead_after) is None


def test_capture_waits_for_a_key_to_hold_still_and_warns_when_it_never_does(caplog):
    """The host-side schedule of captures (no CUDA needed): a key is captured on its third
    arrival in a row (2 eager warm-up steps); a step whose key changes every time (a callback
    adjusting a coefficient each step) stays eager and is announced once."""
    step = CapturedStep(warmup=2)
    assert [step._ready_to_capture("a") for _ in range(3)] == [False, False, True]
    assert [step._ready_to_capture(k) for k in ("b", "c", "c", "d", "d", "d")] == [False, False, False, False, False, True]
    step = CapturedStep(warmup=2)
    step.still_eager = 5
    with caplog.at_level("WARNING", logger="rsae.lit.graph_step"):
        assert not any(step._ready_to_capture((("l1_coefficient", 1.0 + i),)) for i in range(8))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "has not held still" in warnings[0] and "l1_coefficient" in warnings[0]


def test_captured_step_is_eager_off_cuda():
    step = CapturedStep()
    x = torch.randn(3, 2)
    assert step(lambda t: t * 2, x, key=None).equal(x * 2) and step.captures == 0
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(warmup=0)


@pytest.mark.parametrize("make", [lambda: TopKSAE(8, 32, k=2, dead_after_tokens=4),
                                  lambda: RationalSAE(8, 32, gate="topk", k=3, dead_after_tokens=4)])
@pytest.mark.parametrize("dead", [False, True])
def test_auxk_without_a_host_branch_gives_the_same_loss_and_gradients(make, dead):
    """A captured step always runs AuxK (weight 0 when no latent is dead): the same loss and
    gradients as the branch the eager step takes."""
    x = torch.randn(16, 8)
    outs = []
    for branch_free in (False, True):
        sae = make()
        torch.manual_seed(1)
        if dead:
            sae.tokens_since_fired[::3] = 10
        sae.step_in_cuda_graph = branch_free
        out = sae.training_output(x, 0)
        out.loss.backward()
        outs.append((out.losses, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    (l_a, g_a), (l_b, g_b) = outs
    assert set(l_a) == set(l_b)
    for k in l_a:
        torch.testing.assert_close(l_b[k], l_a[k], rtol=0, atol=0)
    assert (float(l_a["aux"].detach()) > 0) == dead
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], rtol=0, atol=0, msg=n)


def test_bad_combinations_fail_clearly():
    with pytest.raises(ConfigError, match="reduce-overhead"):
        SAEModule(ReLUSAE(8, 32), compile=True, compile_mode="reduce-overhead", cuda_graph=True)
    module = SAEModule(ReLUSAE(8, 32), cuda_graph=True)
    module._trainer = SimpleNamespace(world_size=2, precision_plugin=SimpleNamespace(scaler=None))
    with pytest.raises(ConfigError, match="one device"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(world_size=1, precision_plugin=SimpleNamespace(scaler=object()))
    with pytest.raises(ConfigError, match="gradient scaler"):
        module.on_fit_start()
    with pytest.raises(ConfigError, match="module.cuda_graph=false"):
        module.on_load_checkpoint({"state_dict": {}})  # written by an automatic-optimisation run
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)
