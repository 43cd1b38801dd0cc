"""The training module's fast step: what `SAEModule` does for speed, beside its plain step.

* `module.compile`: `step_fn` compiles the step (`SAEModule.train_losses`) and the decoder-norm
  constraint with `torch.compile` (under DDP with Dynamo's graph splitting off, and a graph break
  before the decoder with `module.ddp_split_step`); `run_train` feeds it the step number as a
  device tensor (`step_as_tensor`) so that a new number neither recompiles nor re-records.
* `module.cuda_graph`: `forward_backward` is the step up to the optimizer (forward, backward,
  decoder-gradient projection, clipping), captured once as a CUDA graph and replayed
  (`rsae.lit.graph_step.CapturedStep`), keyed by the SAE's plain settings and autocast
  (`_capture_key`); `renormalize_decoder` replays the decoder re-normalisation as a small graph.
* `clip_gradients`: the clipping folded into a fused Adam's `grad_scale`.

The SAE's side of it (flags, the dead-latent bound a captured step is keyed by, TopK's sparse
step) is `rsae.sae.fast_step`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clip_gradients(parameters, max_norm: float, optimizer=None) -> Tensor | None:
    """Scale the gradients to a total norm of at most `max_norm` (torch's clip_grad_norm_ rule:
    coefficient min(1, max_norm / (norm + 1e-6))), without waiting for the GPU.

    With a fused Adam the coefficient is handed to the optimizer as its `grad_scale` (the fused
    kernel divides every gradient by it while it updates), which saves a pass that reads and
    writes all gradients; the update is the same, only `.grad` keeps the unclipped values.
    Otherwise the gradients are scaled in place. Returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
    if optimizer is not None and _takes_grad_scale(optimizer, grads):
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)
        optimizer.grad_scale = coef.reciprocal()
        return norm
    if optimizer is not None and getattr(optimizer, "grad_scale", None) is not None:
        optimizer.grad_scale = None
    return torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)


def _takes_grad_scale(optimizer, grads: list[Tensor]) -> bool:
    return (type(optimizer) is torch.optim.Adam and bool(optimizer.defaults.get("fused"))
            and len({g.device for g in grads}) == 1 and getattr(optimizer, "found_inf", None) is None)


class FastStep:
    """`SAEModule`'s compiled and captured step (a mixin: it reads the module's settings)."""

    def step_fn(self, name: str):
        """The step's pieces, compiled on first use when `compile=True`: "train" (`train_losses`),
        or a method of the SAE ("remove_parallel_decoder_grad", "normalize_decoder")."""
        fn = self._step_fns.get(name)
        if fn is None:
            fn = self.train_losses if name == "train" else getattr(self.sae, name)
            if self.compile_step and name == "train" and self.compile_mode not in (None, "default"):
                fn = torch.compile(fn, mode=self.compile_mode)
            elif self.compile_step:
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # Dynamo's own DDP graph splitting fails on the SAE step (an invalid partition
                    # node). With one graph, the backward hands DDP every gradient at its end and
                    # the whole all-reduce waits; `ddp_split_step` breaks the graph between encoder
                    # and decoder instead, so the decoder's half can start during the encoder's
                    # backward. On 2 x H200 that overlap won 0.45 ms at 4096 rows per rank but the
                    # lost fusion cost 2 ms at 16384 (BENCHMARKS.md): off by default.
                    torch._dynamo.config.optimize_ddp = False
                    self.sae.graph_break_before_decode = self.ddp_split_step
                fn = torch.compile(fn)
            self._step_fns[name] = fn
        return fn

    def run_train(self, x: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """`train_losses` through `step_fn("train")`. With CUDA graphs (compile_mode
        reduce-overhead) each call starts a new graph step, and the logged values are copied out of
        the graph's memory, which the next replay reuses."""
        fn = self.step_fn("train")
        if self.compile_step and not isinstance(step, Tensor):
            step = self.step_as_tensor(step, x.device)
        if not (self.compile_step and self.compile_mode == "reduce-overhead"):
            return fn(x, step)
        torch.compiler.cudagraph_mark_step_begin()
        loss, losses, l0 = fn(x, step)
        return loss, {k: v.clone() for k, v in losses.items()}, l0.clone()

    def step_as_tensor(self, step: int, device: torch.device) -> Tensor:
        """The step number in a device tensor that keeps its place: as a Python int, each new
        value is a new constant to a compiled step (a recompile, then a symbolic int that CUDA
        graphs re-record per value), and a captured graph would keep the value of its capture."""
        if self._step_tensor is None or self._step_tensor.device != device:
            self._step_tensor = torch.zeros((), dtype=torch.int64, device=device)
        return self._step_tensor.fill_(step)

    def forward_backward(self, batch: Tensor, step: int, optimizer) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """A training step up to the optimizer update (the `cuda_graph` path): the loss, its
        backward, the decoder-gradient projection and the clipping (folded into a fused Adam's
        `grad_scale`). On CUDA it is captured as a CUDA graph after warm-up and replayed. Returns
        (loss, loss terms, L0), in the graph's memory, which the next step overwrites."""
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
        if batch.is_cuda:
            step = self.step_as_tensor(step, batch.device)  # filled here, outside the graph, which reads it
        params = [p for p in self.sae.parameters() if p.requires_grad]

        def body(x: Tensor):
            for p in params:  # the backward writes fresh gradients (captured: into the graph's memory)
                p.grad = None
            loss, losses, l0 = self.run_train(x * self.act_scale, step)
            self.watch_loss(loss.detach(), step)
            loss.backward()
            self.step_fn("remove_parallel_decoder_grad")()
            if self.grad_clip:
                clip_gradients(params, self.grad_clip, inner)
            return loss.detach(), losses, l0, [p.grad for p in params], getattr(inner, "grad_scale", None)

        self.sae.before_captured_step()
        loss, losses, l0, grads, grad_scale = self._captured(body, batch, self._capture_key() if batch.is_cuda else None)
        self.sae.after_captured_step(batch.shape[0])
        # A replay refills the captured gradients (and clipping factor); an eager step in between
        # may have replaced them.
        for p, g in zip(params, grads):
            p.grad = g
        if self.grad_clip:
            inner.grad_scale = grad_scale
        return loss, losses, l0

    def _capture_key(self) -> tuple:
        """What a captured step depends on besides tensors: the SAE's plain settings (a callback
        such as HoldL0 changing a coefficient makes a new step) and autocast."""
        settings = tuple((f"{name}.{k}" if name else k, v) for name, mod in self.sae.named_modules()
                         for k, v in vars(mod).items() if isinstance(v, (bool, int, float, str)))
        device = "cuda"
        return settings, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), torch.is_grad_enabled()

    def renormalize_decoder(self) -> None:
        """The decoder rows back on the unit sphere after an update. With `cuda_graph` its kernels
        are replayed as a small CUDA graph of their own (one launch): launching them one by one, or
        entering the compiled region, costs the host more than the GPU takes to run them."""
        fn = self.step_fn("normalize_decoder")
        w = self.sae.W_dec
        if not (self.cuda_graph and w.is_cuda and self.sae.unit_norm_decoder):
            fn()
            return
        if self._renorm_token is None or self._renorm_token.device != w.device:
            self._renorm_token = torch.zeros(1, device=w.device)  # (the captured call's input: unused)
        self._captured_renorm(lambda _: fn(), self._renorm_token, w.data_ptr())
