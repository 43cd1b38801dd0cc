"""Synthetic superposition data with known features (toy-model style), as a LightningDataModule.

`n_features` ground-truth unit directions in `d_in` dims (n_features > d_in: superposition).
Feature i fires independently with probability p_i proportional to (i+1)^-power_law, scaled so
that on average `mean_active` features fire per token, with magnitude drawn uniformly from
[min_magnitude, max_magnitude]. Batch b of the stream is a pure function of (seed, b), so the
stream is deterministic, needs no storage, and resumes exactly from a batch index.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from rsae.errors import require

_VAL_OFFSET = 1 << 40  # validation batches come from a disjoint part of the seed space


class SyntheticFeatures:
    def __init__(
        self,
        d_in: int,
        n_features: int,
        mean_active: float,
        power_law: float,
        min_magnitude: float,
        max_magnitude: float,
        noise: float,
        seed: int,
    ) -> None:
        require(d_in >= 1 and n_features >= 1, f"d_in and n_features must be >= 1, got {d_in}, {n_features}")
        require(0 < mean_active <= n_features, f"mean_active must be in (0, n_features], got {mean_active}")
        require(0 <= min_magnitude <= max_magnitude, "need 0 <= min_magnitude <= max_magnitude")
        g = torch.Generator().manual_seed(seed)
        self.features = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
        p = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-power_law)
        self.probs = (p / p.sum() * mean_active).clamp(max=1.0).float()
        self.min_magnitude, self.max_magnitude, self.noise, self.seed = min_magnitude, max_magnitude, noise, seed

    def batch(self, index: int, batch_size: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        fires = torch.rand(batch_size, self.probs.numel(), generator=g) < self.probs
        mags = torch.rand(batch_size, self.probs.numel(), generator=g)
        mags = self.min_magnitude + (self.max_magnitude - self.min_magnitude) * mags
        x = (fires * mags) @ self.features
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=g)
        return x


class _Stream(IterableDataset):
    """Batches start, start+1, ... of this rank: global index i * world + rank (ranks never overlap)."""

    def __init__(self, source: SyntheticFeatures, batch_size: int, start: int, stop: int | None, rank: int = 0, world: int = 1) -> None:
        self.source, self.batch_size, self.start, self.stop = source, batch_size, start, stop
        self.rank, self.world = rank, world

    def __iter__(self):
        i = self.start
        while self.stop is None or i < self.stop:
            yield self.source.batch(i * self.world + self.rank, self.batch_size)
            i += 1


class SyntheticDataModule(L.LightningDataModule):
    def __init__(
        self,
        d_in: int = 64,
        n_features: int = 256,
        mean_active: float = 8.0,
        power_law: float = 0.5,
        min_magnitude: float = 0.5,
        max_magnitude: float = 1.5,
        noise: float = 0.0,
        batch_size: int = 1024,
        val_batches: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        self.source = SyntheticFeatures(d_in, n_features, mean_active, power_law, min_magnitude, max_magnitude, noise, seed)
        self.d_in, self.batch_size, self.val_batches = d_in, batch_size, val_batches
        self.ground_truth: Tensor = self.source.features
        self.norm_scale = 1.0
        self._start = 0  # first training batch index (restored on resume)

    def setup(self, stage: str | None = None) -> None:
        sample = torch.cat([self.source.batch(_VAL_OFFSET - 1 - i, self.batch_size) for i in range(4)])
        self.norm_scale = float(self.d_in**0.5 / sample.norm(dim=-1).mean().clamp_min(1e-12))

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.source, self.batch_size, self._start, None, *self._rank_world()), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        # Validation batches are split across ranks too; the metrics are summed over ranks.
        rank, world = self._rank_world()
        stream = _Stream(self.source, self.batch_size, _VAL_OFFSET // world, _VAL_OFFSET // world + self.val_batches // world, rank, world)
        return DataLoader(stream, batch_size=None)

    def state_dict(self) -> dict:
        # Batches the trainer has consumed (not what the loader prefetched): one batch per step.
        consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else self._start
        return {"batches_consumed": int(consumed)}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state["batches_consumed"])
