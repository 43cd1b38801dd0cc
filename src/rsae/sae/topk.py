"""TopK SAE: the skeleton plus the TopK mechanism (`rsae.sae.mechanisms.topk`): keep the k largest
pre-activations per token (then ReLU), with the AuxK loss that revives dead latents.

Training step (`training_output`), unless `rsae.sae.fast.disabled()`:
* On CUDA, from d_sae / k >= SPARSE_STEP_RATIO: the sparse step of `rsae.sae.sparse_step`. After
  the encoder GEMM only the k selected latents per row are touched: Triton kernels decode, form
  the codes' gradient and both weight gradients; the dense codes are formed only if asked for
  (`SAEOutput.z`). A step whose AuxK covers every column (many dead latents, or their number not
  yet known) needs the gradient of the dense pre-activations: its encoder stays dense, its
  decoder is the same sparse one.
* Otherwise: the encoder GEMM without an input gradient, top-k selection by the fastest exact
  method, and the decoder as dense GEMMs, or sparse (`embedding_bag`) from d_sae / k >=
  SPARSE_DECODE_RATIO.
AuxK runs only when some latent is dead, and then only over the columns of the dead latents when
they are few (`fast.aux_capacities`): their own pre-activations and decoder rows, a [batch, <
d_sae / 2] problem instead of a selection over [batch, d_sae]. The host never waits for the GPU
inside a step: the number of dead latents is read from a copy made at the end of the previous
step (`AsyncCount`), or, in a captured step, bounded from older copies (`DeadLatentBound`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rsae.sae import fast, sparse_step
from rsae.sae.base import SAE, SAEOutput, require, resolve_d_sae
from rsae.sae.mechanisms.topk import auxk_loss, default_k_aux, topk_relu

# Decode sparsely when k * ratio <= d_sae, the ratio by device type. CUDA, measured on an H200
# (bf16, k = 32, batch 4096): the sparse decoder (embedding_bag forward and backward) cost 0.86 ms
# against 0.55 ms for the three dense GEMMs at 768 x 24576 (d_sae / k = 768), and 2.9 against
# 4.4 ms at 2304 x 65536 (d_sae / k = 2048): even at d_sae / k of about 1200-1400, so sparse from
# 1280 on. Other devices (not measured): a gathered row taken as costing 64 columns of a GEMM.
SPARSE_DECODE_RATIO = {"cuda": 1280, "other": 128}
# The sparse step of Triton kernels (`rsae.sae.sparse_step`, CUDA) from k * ratio <= d_sae on.
# Measured on an H200 at 768 x 24576, compiled + CUDA graph, sparse against dense: 1.73 / 2.86 ms
# at k = 32 (d_sae / k = 768), 2.58 / 2.92 at k = 128 (192), 4.08 / 3.38 at k = 256 (96); the
# crossover near 150. RSAE_SPARSE_STEP_RATIO overrides it (benchmarks: 1 always, a huge value never).
SPARSE_STEP_RATIO = int(os.environ.get("RSAE_SPARSE_STEP_RATIO", 150))


class TopKSAE(SAE):
    architecture = "topk"
    mechanism = "topk"

    def __init__(
        self,
        d_in: int,
        d_sae: int | None = None,
        k: int = 32,
        aux_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        **kw,
    ) -> None:
        require(isinstance(d_in, int) and d_in >= 1, f"d_in must be a positive integer, got {d_in!r}")
        d_sae = resolve_d_sae(d_in, d_sae, kw.pop("expansion_factor", None))
        require(d_sae >= 1, f"d_sae must be >= 1, got {d_sae}")
        require(0 < k <= d_sae, f"k must satisfy 0 < k <= d_sae ({d_sae}), got {k}")
        require(aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {aux_coefficient}")
        require(k_aux is None or 0 < k_aux <= d_sae, f"k_aux must satisfy 0 < k_aux <= d_sae, got {k_aux}")
        super().__init__(d_in, d_sae, **kw)
        self.k = k
        self.aux_coefficient = aux_coefficient
        self.k_aux = k_aux if k_aux is not None else default_k_aux(d_in, d_sae)
        self._dead_count = fast.AsyncCount()

    def activation(self, h: Tensor) -> Tensor:
        return topk_relu(h, self.k)

    # --- the training step ------------------------------------------------------------------------
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

    def uses_auxk(self) -> bool:
        return self.aux_coefficient > 0

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

    def _kernels_apply(self, x: Tensor) -> bool:
        """The kernels of `rsae.sae.sparse_step` run here, k is small next to d_sae, and deterministic
        algorithms are not asked for (the weight gradients add some rows atomically)."""
        return (sparse_step.applies(x) and x.dim() == 2 and self.k * SPARSE_STEP_RATIO <= self.d_sae
                and not torch.are_deterministic_algorithms_enabled())

    def _decode_sparsely(self, per_row: int) -> bool:
        device = self.W_dec.device.type
        return per_row * SPARSE_DECODE_RATIO.get(device, SPARSE_DECODE_RATIO["other"]) <= self.d_sae

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

    # --- AuxK ---------------------------------------------------------------------------------------
    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        if not self.training or self.aux_coefficient == 0:
            return {}
        return {"aux": auxk_loss(self, x, out.x_hat, out.h, self.k_aux, self.aux_coefficient)}

    def export_config(self) -> dict:
        return {"architecture": "topk", "k": self.k}

    @classmethod
    def kwargs_from_export(cls, cfg: dict) -> dict:
        return {"k": int(cfg["k"])} if "k" in cfg else {}
