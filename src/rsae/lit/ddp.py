"""The DDP strategy of `trainer=ddp`, with the knobs that decide whether it scales.

An SAE's gradient is as large as its weights (2 * d_in * d_sae values: 1.2 GB in float32 at
2304 x 65536), and a training step is short, so the gradient all-reduce is what limits data
parallelism. `grad_compression: bf16` (or fp16) halves what crosses the link (PyTorch's
compression hooks: reduce in the narrow dtype, cast back); a larger per-rank batch
(`data.batch_size`) spreads each all-reduce over more tokens.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

from rsae.errors import ConfigError

COMPRESSION = ("none", "bf16", "fp16")


def ddp_strategy(grad_compression: str = "none", bucket_cap_mb: int = 25, gradient_as_bucket_view: bool = True,
                 static_graph: bool = False, find_unused_parameters: bool = False, **kwargs) -> DDPStrategy:
    """A Lightning DDPStrategy; `grad_compression` picks a gradient communication hook."""
    if grad_compression not in COMPRESSION:
        raise ConfigError(f"trainer.strategy.grad_compression must be one of {COMPRESSION}, got {grad_compression!r}")
    if bucket_cap_mb <= 0:
        raise ConfigError(f"trainer.strategy.bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    hook = None
    if grad_compression != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.bf16_compress_hook if grad_compression == "bf16" else default_hooks.fp16_compress_hook
    return DDPStrategy(ddp_comm_hook=hook, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
                       static_graph=static_graph, find_unused_parameters=find_unused_parameters, **kwargs)
