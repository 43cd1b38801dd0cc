"""The held-out evaluation set: activation rows plus, for LM data, where each row came from.

For an `ActivationDataModule` the held-out split is the cache's `val` split: the last
`val_fraction` of the harvested sequences. `load_heldout(dm, n_tokens)` takes the first
`ceil(n_tokens / context_size)` of those sequences (all of them when fewer exist): their token
ids and keep-mask (`dm.eval_tokens()`) for the downstream metrics, and the activation rows of
their kept positions, in order, with each row's sequence index, position and token id.

Any other data module (e.g. synthetic data) gives only activation rows, the first `n_tokens` of
its `val_dataloader()`; downstream metrics, probing and feature contexts then do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import Tensor


@dataclass
class HeldOut:
    acts: Tensor  # [n_rows, d_in], storage dtype (bf16 or fp32), raw units
    input_ids: Tensor | None = None  # [n_seq, T] int64: the evaluated held-out sequences
    keep: Tensor | None = None  # [n_seq, T] bool: positions that have activation rows
    seq: Tensor | None = None  # [n_rows] index into input_ids
    pos: Tensor | None = None  # [n_rows] position within the sequence
    available_sequences: int | None = None  # held-out sequences in the cache

    @property
    def n_rows(self) -> int:
        return int(self.acts.shape[0])

    @property
    def has_tokens(self) -> bool:
        return self.input_ids is not None

    def batches(self, batch_size: int, device: torch.device | str = "cpu"):
        """Float32 row batches on `device`, in row order."""
        for lo in range(0, self.n_rows, batch_size):
            yield self.acts[lo:lo + batch_size].to(device).float()


def load_heldout(dm, n_tokens: int) -> HeldOut:
    """Held-out rows (and their tokens, for LM activation caches) from a set-up data module."""
    if n_tokens < 1:
        raise ValueError(f"eval.n_tokens must be >= 1, got {n_tokens}")
    manifest = getattr(dm, "manifest", None)
    if manifest is not None and hasattr(dm, "eval_tokens"):
        return _from_cache(dm, manifest, n_tokens)
    rows, n = [], 0
    for batch in dm.val_dataloader():
        rows.append(batch[: n_tokens - n])
        n += rows[-1].shape[0]
        if n >= n_tokens:
            break
    if not rows:
        raise ValueError("the data module's validation split is empty")
    return HeldOut(acts=torch.cat(rows))


def _from_cache(dm, manifest, n_tokens: int) -> HeldOut:
    input_ids, keep = dm.eval_tokens()
    n_avail, context = input_ids.shape
    if n_avail == 0:
        raise ValueError(f"the activation cache {manifest.root} has no held-out sequences (val_fraction=0?)")
    n_seq = min(n_avail, math.ceil(n_tokens / context))
    n_train = int(manifest.data["tokens"]["train_sequences"])
    acts, seqs, positions, tokens = [], [], [], []
    for path in manifest.shard_paths("val"):
        with safe_open(str(path), framework="pt") as f:
            seq = f.get_tensor("seq").long() - n_train
            take = int((seq < n_seq).sum())  # rows are in sequence order
            if take == 0:
                break
            acts.append(f.get_slice("acts")[:take])
            seqs.append(seq[:take])
            positions.append(f.get_tensor("pos")[:take].long())
            tokens.append(f.get_tensor("tokens")[:take].long())
            if take < len(seq):
                break
    input_ids, keep = input_ids[:n_seq], keep[:n_seq]
    held = HeldOut(acts=torch.cat(acts), input_ids=input_ids, keep=keep, seq=torch.cat(seqs),
                   pos=torch.cat(positions), available_sequences=n_avail)
    # The rows must be exactly the kept positions of these sequences, in order.
    expected = int(keep.sum())
    if held.n_rows != expected or not torch.equal(input_ids[held.seq, held.pos], torch.cat(tokens)):
        raise RuntimeError(f"activation cache {manifest.root}: val rows do not match the stored held-out tokens "
                           f"({held.n_rows} rows, {expected} kept positions); delete the cache to rebuild it")
    return held
