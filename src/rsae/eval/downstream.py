"""Downstream metrics: splice an SAE's reconstruction into the language model and measure the loss.

One function, `downstream_metrics`, used by `evaluate.py`, the training callback and the upgrade
pipeline. Conventions (docs/design.md, section 2), for token sequences `input_ids [N, T]` and a keep-mask
`keep [N, T]` (False at BOS / EOS / padding / other special tokens, as the activation cache
stores it):

* **Spliced and ablated positions**: every position `t` with `keep[n, t]`. There the hooked
  activation is replaced by the SAE reconstruction (`ce_spliced`) or by zeros (`ce_zero`); every
  other position keeps its clean activation.
* **Scored tokens**: next-token prediction. The logits at position `t` are scored against the
  token at `t + 1`, for `t = 0 .. T-2`, whenever that target is a real token, i.e. not padding
  (`attention_mask[n, t + 1] == 1`; the input at `t` must be real too). Sequences from our
  caches are packed text with no padding, so every target `1 .. T-1` of every sequence is
  scored, exactly as `model(input_ids, labels=input_ids).loss` in `transformers` does. BOS is
  never a target (it only occurs at position 0).
* **CE**: mean over all scored tokens of all sequences (token-weighted, natural log) of
  `-log p(target)`; `ce_clean`, `ce_spliced`, `ce_zero`.
* `delta_ce = ce_spliced - ce_clean`;
  `loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`.
* `kl` = mean over the same scored positions of `KL(p_clean || p_spliced)` over the vocabulary
  (natural log).

Sums are accumulated in float64; logits are converted to float32 before the softmax. On CUDA the
LM runs under bf16 autocast by default; the SAE always runs in float32 (autocast off), so which
latents fire does not depend on the LM's precision.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rsae.data.hooks import splice

ReconstructFn = Callable[[Tensor], Tensor]

DOWNSTREAM_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "delta_ce", "loss_recovered", "kl")


def sae_reconstructor(sae: torch.nn.Module, scale: float | Tensor = 1.0) -> ReconstructFn:
    """`activation [..., d] -> reconstruction [..., d]` in raw units, computed in float32.

    `scale` is the factor the SAE's inputs were multiplied by in training (`SAEModule.act_scale`);
    an exported SAE works on raw activations and needs the default 1.
    """

    def reconstruct(act: Tensor) -> Tensor:
        shape = act.shape
        flat = act.reshape(-1, shape[-1]).float()
        with _no_autocast(act.device):
            x_hat = sae(flat * scale) / scale
        return x_hat.reshape(shape).to(act.dtype)

    return reconstruct


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast(device: torch.device, dtype: str | torch.dtype | None):
    """bf16 autocast on CUDA by default ('auto'); None/'none' or CPU: full precision."""
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    if dtype in (None, "none", "float32", torch.float32):
        return contextlib.nullcontext()
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _masked_replace(keep: Tensor, replacement: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """`act -> where(keep, replacement(act), act)`; `keep` is `[B, T]`."""

    def fn(act: Tensor) -> Tensor:
        if act.shape[:2] != keep.shape:
            raise ValueError(f"hooked activation has shape {tuple(act.shape)}; expected [batch, seq, d] with "
                             f"[batch, seq] = {tuple(keep.shape)}")
        new = replacement(act)
        return torch.where(keep.to(act.device)[..., None], new.to(act.dtype), act)

    return fn


def _logits(model, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, :-1].float()  # predictions for targets 1 .. T-1


@torch.inference_mode()
def downstream_metrics(
    model: torch.nn.Module,
    hook: str,
    layer: int | None,
    reconstruct_fn: ReconstructFn,
    input_ids: Tensor,
    keep_mask: Tensor,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    autocast_dtype: str | torch.dtype | None = "auto",
    progress: bool = False,
    desc: str = "downstream",
) -> dict[str, float]:
    """CE of the LM with the activation at `hook`/`layer` clean, spliced and zero-ablated.

    Args:
        model: a Hugging Face causal LM (eval mode; its device is used).
        hook, layer: hook point as in `rsae.data.hooks.resolve_hook`.
        reconstruct_fn: `activation [B, T, d] -> reconstruction [B, T, d]` in raw units (see
            `sae_reconstructor`); applied at kept positions only.
        input_ids: `[N, T]` token ids; keep_mask: `[N, T]` bool, positions to splice/ablate.
        batch_size: sequences per forward pass.
        attention_mask: `[N, T]`, 1 for real tokens and 0 for padding (None: no padding).
        autocast_dtype: `"auto"` (bf16 on CUDA, none on CPU), a dtype, or None.

    Returns floats: `ce_clean, ce_spliced, ce_zero, delta_ce, loss_recovered, kl` (see module
    docstring), plus `n_sequences`, `n_scored` (scored target tokens) and `n_spliced` (positions
    replaced).
    """
    if input_ids.ndim != 2 or keep_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and keep_mask {tuple(keep_mask.shape)} must both be [N, T]")
    if input_ids.shape[1] < 2:
        raise ValueError("sequences need at least 2 tokens to score a next-token prediction")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    f64 = dict(dtype=torch.float64, device=device)
    sums = {k: torch.zeros((), **f64) for k in ("clean", "spliced", "zero", "kl")}
    n_scored = n_spliced = 0
    n = input_ids.shape[0]
    bar = tqdm(total=n, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    for lo in range(0, n, batch_size):
        ids = input_ids[lo:lo + batch_size].to(device)
        keep = keep_mask[lo:lo + batch_size].to(device).bool()
        am = None if attention_mask is None else attention_mask[lo:lo + batch_size].to(device)
        if am is not None:
            real = am.bool()
            keep = keep & real  # never splice into padding
            scored = real[:, 1:] & real[:, :-1]
        else:
            scored = torch.ones_like(ids[:, 1:], dtype=torch.bool)
        targets = ids[:, 1:]

        def nll_sum(logp: Tensor) -> Tensor:
            nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
            return nll.double()[scored].sum()

        # At most two [B, T-1, vocab] float32 tensors alive at a time.
        with _autocast(device, autocast_dtype):
            with splice(model, hook, layer, _masked_replace(keep, torch.zeros_like)):
                sums["zero"] += nll_sum(torch.log_softmax(_logits(model, ids, am), dim=-1))
            logp_clean = torch.log_softmax(_logits(model, ids, am), dim=-1)
            sums["clean"] += nll_sum(logp_clean)
            with splice(model, hook, layer, _masked_replace(keep, reconstruct_fn)):
                logp_spliced = torch.log_softmax(_logits(model, ids, am), dim=-1)
        sums["spliced"] += nll_sum(logp_spliced)
        # KL(p_clean || p_spliced) per position, summed over the vocabulary (in place: no third copy).
        diff = logp_spliced.neg_().add_(logp_clean)  # log p_clean - log p_spliced
        kl = diff.mul_(logp_clean.exp_()).sum(-1)
        sums["kl"] += kl.double()[scored].sum()
        n_scored += int(scored.sum())
        n_spliced += int(keep.sum())
        del logp_clean, logp_spliced, diff
        bar.update(ids.shape[0])
    bar.close()
    if n_scored == 0:
        raise ValueError("no scored tokens: every target is padding")
    ce_clean, ce_spliced, ce_zero, kl = (float(sums[k] / n_scored) for k in ("clean", "spliced", "zero", "kl"))
    return {
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_zero": ce_zero,
        "delta_ce": ce_spliced - ce_clean,
        "loss_recovered": loss_recovered(ce_clean, ce_spliced, ce_zero),
        "kl": kl,
        "n_sequences": int(n),
        "n_scored": n_scored,
        "n_spliced": n_spliced,
    }


def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """`(ce_zero - ce_spliced) / (ce_zero - ce_clean)`; NaN when zero ablation changes nothing."""
    denom = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / denom + 0.0 if denom != 0 else float("nan")
