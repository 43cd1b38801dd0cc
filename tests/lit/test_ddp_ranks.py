"""What ranks agree on under DDP (2 gloo processes): `LaggedSigtermCheck` brings rank 0's SIGTERM
flag to every rank, and every rank stops at the same batch, `lag` batches after the flag was
raised; `merge_firing_across_ranks` leaves every rank with the dead-latent counts of one process
that saw all ranks' rows; HoldL0 gives every rank the coefficient of the ranks' mean L0."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rsae.errors import ConfigError
from rsae.lit.ddp import LaggedSigtermCheck, ddp_strategy


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_trainer():
    return types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cpu")), received_sigterm=False)


def _rank(rank: int, world: int, port: int, lag: int, raise_at: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer = _fake_trainer()
    check = LaggedSigtermCheck(trainer, lag=lag)
    stopped_at = None
    for batch in range(raise_at + lag + 5):
        if rank == 0 and batch == raise_at:
            trainer.received_sigterm = True  # only rank 0 saw the signal
        try:
            check()
        except SIGTERMException:
            stopped_at = batch
            break
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(stopped_at))
    dist.destroy_process_group()


@pytest.mark.parametrize("lag", [0, 2])
def test_every_rank_stops_at_the_same_batch_lag_batches_late(tmp_path, lag):
    out = str(tmp_path / "stopped")
    mp.spawn(_rank, args=(2, _free_port(), lag, 3, out), nprocs=2, join=True)
    assert [open(f"{out}.{r}").read() for r in range(2)] == [str(3 + lag)] * 2


def test_lag_must_not_be_negative():
    with pytest.raises(ConfigError, match="lag"):
        LaggedSigtermCheck(_fake_trainer(), lag=-1)
    with pytest.raises(ConfigError, match="sigterm_check_lag"):
        ddp_strategy(sigterm_check_lag=-1)


def _firing_rank(rank: int, world: int, port: int, out: str) -> None:
    from rsae.sae import TopKSAE
    from rsae.sae import fast

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sae = TopKSAE(4, 6, k=2)
    recorded = []  # TopK's async dead flag must be recorded for the merged counts (else the host waits)
    sae._record_dead = lambda: recorded.append(fast.tensor_version(sae.tokens_since_fired))
    sae.tokens_since_fired.copy_(torch.tensor([0, 5, 7, 9, 100, 3]))  # the same on every rank
    # Rank 0 fires latents 0 and 1, rank 1 fires latent 1 and 3 (3 rows per rank).
    z = torch.zeros(3, 6)
    z[0, [0, 1] if rank == 0 else [1, 3]] = 1.0
    sae._track_firing(z)
    sae.merge_firing_across_ranks(3)
    assert recorded == [fast.tensor_version(sae.tokens_since_fired)]
    torch.save(sae.tokens_since_fired, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_merge_their_firing_counts_into_what_one_process_would_count(tmp_path):
    out = str(tmp_path / "counts")
    mp.spawn(_firing_rank, args=(2, _free_port(), out), nprocs=2, join=True)
    want = torch.tensor([0, 0, 7 + 6, 0, 100 + 6, 3 + 6])  # fired on either rank -> 0, else + 2 x 3 rows
    for r in range(2):
        assert torch.equal(torch.load(f"{out}.{r}"), want)


def _hook_rank(rank: int, world: int, port: int, compression: str, out: str) -> None:
    from rsae.lit.ddp import narrow_allreduce_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(100 + rank))  # a different gradient per rank
    hand = grad.clone()
    dist.all_reduce(hand)  # the exact mean over ranks, in float32
    hand /= world
    buf = grad.clone()
    bucket = types.SimpleNamespace(buffer=lambda: buf)  # what the hook reads of DDP's GradBucket
    got = narrow_allreduce_hook(getattr(torch, compression))(None, bucket).wait()
    assert got is buf  # averaged in place, as DDP expects of a hook's result
    torch.save({"hand": hand, "got": got}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("compression", ["bfloat16", "float16"])
def test_narrow_hook_averages_gradients_across_ranks(tmp_path, compression):
    """The narrow all-reduce hook gives every rank the mean of the ranks' gradient buckets, to the
    narrow dtype's precision (a sum instead of a mean would be 2x off). Its use inside DDP is
    covered by tests/jobs/test_multirun_ddp.py (train.py with bf16 compression, 2 processes)."""
    out = str(tmp_path / "grads")
    mp.spawn(_hook_rank, args=(2, _free_port(), compression, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in range(2))
    assert torch.equal(r0["got"], r1["got"])  # every rank holds the same averaged gradient
    assert torch.equal(r0["hand"], r1["hand"])
    hand, got = r0["hand"], r0["got"]
    tol = 1e-2 if compression == "bfloat16" else 2e-3
    assert torch.allclose(got, hand, rtol=tol, atol=tol * hand.abs().max().item()), (got - hand).abs().max()
    assert not torch.equal(got, hand)  # it really went through the narrow dtype


def _hold_rank(rank: int, world: int, port: int, out: str) -> None:
    from rsae.lit.l0_control import HoldL0

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    module = types.SimpleNamespace(sae=types.SimpleNamespace(l1_coefficient=1.0), log=lambda *a, **k: None)
    hold = HoldL0(target_l0=10.0, rate=0.1)
    for l0 in ([12.0, 30.0, 4.0] if rank == 0 else [28.0, 10.0, 16.0]):  # means 20, 20, 10
        module.last_train_l0 = torch.tensor(l0)
        hold.on_train_batch_end(None, module, None, None, 0)
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(float(module.sae.l1_coefficient)))
    dist.destroy_process_group()


def test_hold_l0_gives_every_rank_the_coefficient_of_the_mean_l0(tmp_path):
    from rsae.lit.l0_control import HoldL0

    out = str(tmp_path / "coef")
    mp.spawn(_hold_rank, args=(2, _free_port(), out), nprocs=2, join=True)
    got = [float(open(f"{out}.{r}").read()) for r in range(2)]
    single = types.SimpleNamespace(sae=types.SimpleNamespace(l1_coefficient=1.0), log=lambda *a, **k: None)
    hold = HoldL0(target_l0=10.0, rate=0.1)
    for l0 in (20.0, 20.0, 10.0):
        single.last_train_l0 = torch.tensor(l0)
        hold.on_train_batch_end(None, single, None, None, 0)
    assert got[0] == got[1] == pytest.approx(float(single.sae.l1_coefficient), rel=1e-6)
    assert got[0] > 1.0
