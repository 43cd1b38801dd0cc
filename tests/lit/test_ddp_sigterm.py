"""`LaggedSigtermCheck`: rank 0's SIGTERM flag reaches every rank, and every rank stops at the same
batch, `lag` batches after the flag was raised (2 gloo processes)."""

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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stopped")
    mp.spawn(_rank, args=(2, port, lag, 3, out), nprocs=2, join=True)
    assert [open(f"{out}.{r}").read() for r in range(2)] == [str(3 + lag)] * 2


def test_lag_must_not_be_negative():
    with pytest.raises(ConfigError, match="lag"):
        LaggedSigtermCheck(_fake_trainer(), lag=-1)
    with pytest.raises(ConfigError, match="sigterm_check_lag"):
        ddp_strategy(sigterm_check_lag=-1)
