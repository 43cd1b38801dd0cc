"""The fast training step beside the reference: what a step needs to be compiled, captured as a
CUDA graph, run through the sparse kernels or under DDP, kept out of the architectures' maths.

* `StepHooks` (every SAE): the flags the training module sets (`graph_break_before_decode` for a
  compiled step under DDP, `step_in_cuda_graph` for a captured one), the host-side decisions a
  captured step is recorded with (`before_captured_step` / `after_captured_step`: a wait-free bound
  on the dead latents for AuxK), how many columns this step's AuxK covers (`aux_columns`), and the
  merge of the dead-latent counts across DDP ranks.
* `TopKFastStep` (TopK; `BatchTopKFastStep` with the batch selection for BatchTopK, Matryoshka): TopK's one fast override of `training_output`, unless
  `rsae.sae.fast.disabled()`. On CUDA, from d_sae / k >= `topk.SPARSE_STEP_RATIO`, the sparse step of
  `rsae.sae.sparse_step`: after the encoder GEMM only the k selected latents per row are touched,
  forward and backward, and the dense codes are formed only if asked for (`SAEOutput.z`); a step
  whose AuxK covers every column needs the gradient of the dense h, so its encoder stays dense.
  Otherwise the encoder without an input gradient, the fastest exact top-k (`fast.topk_select`), and
  the decoder as dense GEMMs or sparse (`embedding_bag`) from d_sae / k >= `topk.SPARSE_DECODE_RATIO`.
  AuxK runs only when some latent is dead, over the dead latents' own columns when they are few
  (`fast.aux_capacities`); the host never waits for the GPU inside a step: the dead count comes
  from a copy made at the end of the previous step (`fast.AsyncCount`), or, in a captured step, a
  bound from older copies (`fast.DeadLatentBound`).

The kernels stay beside their float64-tested references: `rsae.sae.fast` (encoder, sparse decoder,
selection), `rsae.sae.sparse_step` / `sparse_kernel`, `rsae.sae.topk_kernel`, `rsae.rational.kernel`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.sae import fast, sparse_step
from rsae.sae.mechanisms.batchtopk import batch_topk_entries
from rsae.sae.output import SAEOutput


class StepHooks:
    """What the training module sets and calls on every SAE for a compiled, captured or DDP step."""

    # Set by the training module for a compiled step under DDP (module.ddp_split_step).
    graph_break_before_decode: bool = False
    # Set by the training module when the step is captured as a CUDA graph (module.cuda_graph):
    # the step must take the same path every time, without the host reading device values.
    step_in_cuda_graph: bool = False

    def _decoder_boundary(self) -> None:
        """A compiled step breaks its graph here when asked: its backward then runs as two
        graphs, decoder first, so DDP can all-reduce the decoder's gradient while the encoder's
        backward still runs, instead of both after one graph. (No-op when not compiling.)"""
        if self.graph_break_before_decode:
            torch._dynamo.graph_break()

    @torch.no_grad()
    def merge_firing_across_ranks(self, rows_per_rank: int) -> None:
        """Data-parallel training: each rank has just counted its own rows. Afterwards every rank
        holds what one process that saw all ranks' rows would: 0 where a latent fired on any rank,
        else the count plus every rank's rows. (All ranks enter with the same counts.)"""
        world = torch.distributed.get_world_size()
        counts = self.tokens_since_fired
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MIN)  # 0 if it fired anywhere
        counts.add_((counts > 0).long() * ((world - 1) * rows_per_rank))

    # --- captured steps (module.cuda_graph) ---------------------------------------------------
    def uses_auxk(self) -> bool:
        """Whether the training loss has an AuxK term, which only matters when a latent is dead."""
        return False

    def before_captured_step(self) -> None:
        """Host-side decisions a captured step is recorded with (part of its key): with AuxK,
        how many latents can be dead now, rounded up to a `fast.aux_capacities` size
        (`fast.DeadLatentBound`, no waiting). When none can, the step leaves AuxK out, as the eager
        step does; otherwise it runs AuxK over that many columns (weight 0 if in fact none is
        dead)."""
        if self.uses_auxk():
            self._aux_capacity = self._dead_bound().capacity(self.dead_after_tokens, self.d_sae)

    def after_captured_step(self, n_tokens: int) -> None:
        if self.uses_auxk():
            self._dead_bound().record(self.tokens_since_fired, n_tokens, self.dead_after_tokens)

    def aux_columns(self) -> int:
        """How many columns this step's AuxK covers: 0 (no latent dead), a `fast.aux_capacities` size
        that holds every dead latent, or d_sae. A fast step decided it without waiting for the GPU
        (TopK's, `_step_aux_capacity`; a captured one, `before_captured_step`); the plain step (the
        reference) counts the dead latents and always covers every column."""
        capacity = getattr(self, "_step_aux_capacity", None)
        if capacity is None and self.step_in_cuda_graph:
            capacity = getattr(self, "_aux_capacity", self.d_sae)
        if capacity is None:
            capacity = self.d_sae if bool(self.dead_mask().any()) else 0
        return capacity

    def _dead_bound(self) -> fast.DeadLatentBound:
        if getattr(self, "_bound", None) is None:
            self._bound = fast.DeadLatentBound()
        return self._bound


class TopKFastStep:
    """TopK's fast `training_output` (see the module docstring); the architecture supplies `k`,
    `_kernels_apply` and `_decode_sparsely` (its thresholds for the sparse paths)."""

    def training_output(self, x: Tensor, step: int = 0) -> SAEOutput:
        if not self._fast_path():
            return super().training_output(x, step)
        self._check_input(x)
        aux_every_column = self._plan_aux()
        kernels = self._kernels_apply(x)
        if kernels and not aux_every_column:  # only the k selected latents per row, forward and backward
            # (AuxK, if on, over the few dead latents' own columns: `aux_losses`)
            values, indices, h, entries = sparse_step.topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.k)
            self._decoder_boundary()
            x_hat = sparse_step.sparse_decode(values, indices, entries, self.W_dec, self.b_dec)
            out = SAEOutput(x_hat=x_hat, h=h, sparse_codes=(values, indices))
        elif kernels:  # AuxK over every column needs the gradient of the dense h: a dense encoder
            h = self.pre_acts(x)
            values, indices = self._top_values(h)
            self._decoder_boundary()
            x_hat = sparse_step.sparse_decode(values, indices, None, self.W_dec, self.b_dec)
            out = SAEOutput(x_hat=x_hat, h=h, sparse_codes=(values, indices))
        else:
            h = self.pre_acts(x)
            values, indices, offsets, z = self._select(h)
            self._decoder_boundary()
            if self._decode_sparsely(values.numel() // max(1, x.shape[0])):
                x_hat = fast.sparse_decode(values, indices, self.W_dec, self.b_dec, offsets)
            else:
                x_hat = self.decode(z)
            out = SAEOutput(x_hat=x_hat, z=z, h=h)
        out.losses["mse"] = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        aux = self.aux_losses(x, out, step)  # (a statement: TopK's AuxK breaks a compiled graph here,
        out.losses.update(aux)  # and a break with the losses' dict on the stack would guard on that dict)
        self._step_aux_capacity = None
        if self.training:
            fired = torch.zeros(self.d_sae, dtype=torch.int32, device=x.device)
            fired.index_add_(0, indices.reshape(-1), (values.detach() != 0).reshape(-1).to(torch.int32))
            fast.mark_fired(self.tokens_since_fired, fired > 0, x.shape[0])
            self._record_dead()
        return out

    def _fast_path(self) -> bool:
        return fast.enabled()

    def merge_firing_across_ranks(self, rows_per_rank: int) -> None:
        super().merge_firing_across_ranks(rows_per_rank)
        if self._fast_path():  # the counts changed: record the dead flag the next step reads for them
            self._record_dead()  # (a flag for the old counts would not match, and the host would wait)

    def _select(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(values [B, k] after the ReLU, latent indices [B, k], None, dense codes z)."""
        values, indices = self._top_values(h)
        return values, indices, None, torch.zeros_like(h).scatter(-1, indices, values)

    def _top_values(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(the k largest entries of each row after the ReLU, differentiable in h; their latents)."""
        indices = fast.topk_select(h.detach(), self.k)[1]
        return h.gather(-1, indices).relu(), indices

    @torch.compiler.disable
    def _plan_aux(self) -> bool:
        """Decides on the host how many columns this step's AuxK covers (`_step_aux_capacity`: 0
        leaves AuxK out, d_sae covers every column) and returns whether that is every column, the
        one choice the rest of the step branches on. Outside any compiled graph, and so is AuxK
        itself (`aux_losses`): a compiled step sees a bool, never the count, so AuxK switching on
        or growing costs no recompilation (it cost 4-8 s mid-run when the count was traced)."""
        capacity = self._dead_capacity() if self.training and self.aux_coefficient > 0 else 0
        self._step_aux_capacity = capacity
        return capacity >= self.d_sae

    def _dead_capacity(self) -> int:
        if self.step_in_cuda_graph:  # decided before the step, without waiting (`before_captured_step`)
            return getattr(self, "_aux_capacity", self.d_sae)
        count = self._dead_count.read(fast.tensor_version(self.tokens_since_fired))
        return fast.aux_capacity(int(self.dead_mask().sum()) if count is None else count, self.d_sae)

    @torch.compiler.disable
    def _record_dead(self) -> None:
        if self.tokens_since_fired.is_cuda and not self.step_in_cuda_graph:
            self._dead_count.record(self.dead_mask().sum(), fast.tensor_version(self.tokens_since_fired))


class BatchTopKFastStep(TopKFastStep):
    """TopK's fast step with BatchTopK's selection: rows keep varying numbers of entries, so no
    sparse kernels; in eval mode the codes come from the inference threshold (the plain step)."""

    def _fast_path(self) -> bool:
        return super()._fast_path() and self.training

    def _kernels_apply(self, x: Tensor) -> bool:
        return False

    def _select(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """The k*B largest ReLU'd entries of the batch, sorted by position so that each token's
        entries are contiguous: (values, latent indices, each token's first entry, dense codes)."""
        values, latents, offsets, z = batch_topk_entries(h, self.k)
        if self.training:
            self._update_threshold(values.detach())
        return values, latents, offsets, z
