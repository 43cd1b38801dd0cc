"""The DDP strategy of `trainer=ddp`, with the knobs that decide whether it scales.

An SAE's gradient is as large as its weights (2 * d_in * d_sae values: 1.2 GB in float32 at
2304 x 65536), and a training step is short, so the gradient all-reduce is what limits data
parallelism. `grad_compression: bf16` (or fp16) halves what crosses the link
(`narrow_allreduce_hook`: average in the narrow dtype, cast back); a larger per-rank batch
(`data.batch_size`) spreads each all-reduce over more tokens.

Lightning (2.6) broadcasts a SIGTERM flag from rank 0 before every training batch and reads it
with `.item()`: on GPUs that is one host synchronisation per step, so the host stops queueing
work until the GPU has drained, and the step costs GPU time plus the host's Python time instead
of the larger of the two. `LaggedSigtermCheck` keeps the broadcast but reads each flag `lag`
batches later, when the GPU has long finished it: every rank still stops at the same batch.
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rsae.errors import ConfigError

COMPRESSION = ("none", "bf16", "fp16")


class LaggedSigtermCheck:
    """A drop-in for the training epoch loop's `_broadcast_sigterm_tensor`: broadcast rank 0's
    SIGTERM flag every batch as Lightning does, but read the flag of `lag` batches ago (copied to
    pinned memory without blocking), so that the host never waits for the current step."""

    def __init__(self, trainer, lag: int = 2) -> None:
        if lag < 0:
            raise ConfigError(f"sigterm check lag must be >= 0, got {lag}")
        self.trainer, self.lag = trainer, int(lag)
        self.flag: torch.Tensor | None = None
        self.ring: list[torch.Tensor] = []
        self.pending: deque = deque()  # (ring slot, CUDA event or None), oldest first
        self.calls = 0

    def __call__(self) -> None:
        device = self.trainer.strategy.root_device
        cuda = device.type == "cuda"
        if self.flag is None:
            self.flag = torch.zeros(1, dtype=torch.int32, device=device)
            self.ring = [torch.zeros(1, dtype=torch.int32, pin_memory=cuda) for _ in range(self.lag + 1)]
        self.flag.fill_(1 if getattr(self.trainer, "received_sigterm", False) else 0)  # no host-to-device copy
        torch.distributed.broadcast(self.flag, src=0)
        slot = self.calls % len(self.ring)
        self.calls += 1
        self.ring[slot].copy_(self.flag, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self.pending.append((slot, event))
        if len(self.pending) <= self.lag:
            return
        slot, event = self.pending.popleft()
        if event is not None:
            event.synchronize()  # the GPU finished that batch `lag` batches ago: no drain
        if int(self.ring[slot][0]) == 1:
            with contextlib.suppress(Exception):
                torch.distributed.barrier()  # every rank reads the same flag at the same batch
            raise SIGTERMException()


class RsaeDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy with the per-batch SIGTERM check made lag-tolerant (see module doc)."""

    def __init__(self, *args, sigterm_check_lag: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sigterm_check_lag = sigterm_check_lag

    def setup(self, trainer) -> None:
        super().setup(trainer)
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is not None and hasattr(loop, "_broadcast_sigterm_tensor"):  # private API: keep Lightning's if it moves
            loop._broadcast_sigterm_tensor = LaggedSigtermCheck(trainer, self.sigterm_check_lag)


def narrow_allreduce_hook(dtype: torch.dtype):
    """A DDP communication hook that averages each gradient bucket in `dtype` (bf16 or fp16): one
    cast down, one all-reduce with NCCL's AVG (the division happens inside the reduction: no
    separate pass over the bucket, unlike PyTorch's compression hooks), one cast back in place."""

    def hook(state, bucket):
        group = state if state is not None else torch.distributed.group.WORLD
        buf = bucket.buffer()
        narrow = buf.to(dtype)
        if torch.distributed.get_backend(group) == "nccl":
            op = torch.distributed.ReduceOp.AVG
        else:  # gloo has no AVG
            narrow.div_(torch.distributed.get_world_size(group))
            op = torch.distributed.ReduceOp.SUM
        fut = torch.distributed.all_reduce(narrow, op=op, group=group, async_op=True).get_future()

        def widen(f):
            buf.copy_(f.value()[0])
            return buf

        return fut.then(widen)

    hook.__name__ = f"{str(dtype).removeprefix('torch.')}_avg_allreduce_hook"
    return hook


def ddp_strategy(grad_compression: str = "none", bucket_cap_mb: int = 25, gradient_as_bucket_view: bool = True,
                 static_graph: bool = False, find_unused_parameters: bool = False, sigterm_check_lag: int = 2,
                 **kwargs) -> DDPStrategy:
    """A Lightning DDPStrategy; `grad_compression` picks a gradient communication hook."""
    if grad_compression not in COMPRESSION:
        raise ConfigError(f"trainer.strategy.grad_compression must be one of {COMPRESSION}, got {grad_compression!r}")
    if bucket_cap_mb <= 0:
        raise ConfigError(f"trainer.strategy.bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    if sigterm_check_lag < 0:
        raise ConfigError(f"trainer.strategy.sigterm_check_lag must be >= 0, got {sigterm_check_lag}")
    hook = None
    if grad_compression != "none":
        hook = narrow_allreduce_hook(torch.bfloat16 if grad_compression == "bf16" else torch.float16)
    return RsaeDDPStrategy(ddp_comm_hook=hook, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
                           static_graph=static_graph, find_unused_parameters=find_unused_parameters,
                           sigterm_check_lag=sigterm_check_lag, **kwargs)
