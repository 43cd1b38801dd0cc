"""LightningDataModule streaming LM activations from a cache it builds on first use.

Contract relied on by training and evaluation:

* `prepare_data()` harvests the cache when missing, else checks it matches the request and is intact.
* after `setup("fit")`: `d_in` (int), `norm_scale` (float: E||norm_scale * x|| = sqrt(d_in) over
  the training rows), `ground_truth = None` (real data has no known features).
* `train_dataloader()`: endless deterministic stream of raw float32 `[batch_size, d_in]` batches.
  Under a Lightning trainer with `num_workers=0` they are gathered into a ring of
  `REUSE_BUFFERS` reused tensors (a batch stays valid for the next `REUSE_BUFFERS - 1` batches;
  the training loop holds two); called directly, every batch is a fresh tensor.
* `val_dataloader()`: the held-out split in fixed order (finite).
* `state_dict()` / `load_state_dict()`: the stream position (batches the trainer consumed).
* `eval_tokens()`: held-out token ids and keep-mask; `lm_kwargs`, `hook`, `layer`: how to load and
  hook the LM for spliced evaluation; `language_model()`: that LM, loaded once per process (a
  harvest on the CPU keeps the model it loaded, so the spliced evaluation does not load it again).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from rsae.data.cache import MANIFEST
from rsae.data.cache_manifest import Manifest, load_eval_tokens
from rsae.data.harvest import build_request, harvest_many
from rsae.data.hooks import HOOK_NAMES, hook_points
from rsae.data.stream import StreamLoader, TrainStream, ValStream
from rsae.data.text import resolve_document_separator

REUSE_BUFFERS = 4  # training batches live in a ring of this many buffers (num_workers=0)
_STREAM_KEYS = ("seed", "batch_size", "block_rows", "shuffle_buffer", "world_size", "num_workers")


def default_cache_dir(root: str, name_or_path: str, gguf_file: str | None, hook: str, layer, n_tokens: int,
                      context_size: int, storage_dtype: str, document_separator: str = "text") -> Path:
    """`<root>/<model>/<hook>.<layer>-<n_tokens>x<context_size>-<storage_dtype>[-<eos|bos>]`, model
    named after the last part of its path or hub id (a mismatching cache found there is still an
    error); documents separated by a token get their own directory."""
    model = str(gguf_file or name_or_path).rstrip("/").split("/")[-1].removesuffix(".gguf")
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", model) or "model"
    name = f"{hook}.{layer}-{n_tokens}x{context_size}-{storage_dtype}"
    if document_separator != "text":
        name += f"-{document_separator}"
    return Path(os.path.expanduser(str(root))) / model / name


def consumed_batches(trainer, default: int) -> int:
    """Training batches the trainer has processed (restored from a checkpoint on resume), or
    `default` without a trainer; what a data module's checkpoint position is."""
    if trainer is not None:
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        except AttributeError:
            pass
    return default


class ActivationDataModule(L.LightningDataModule):
    """Activations of `name_or_path` at `hook`/`layer` on `text_files` (or hub `dataset`).

    Args:
        name_or_path, gguf_file, revision, lm_dtype: the LM (see `rsae.data.lm.load_lm`).
        hook, layer: hook point (`resid_post`, `resid_pre`, `mlp_out`, `attn_out`, or a module path).
            Either may be a list: every hook at every layer, harvested in one forward pass into
            one cache each (`prepare_data` only: a run trains one SAE, on one hook point).
        harvest_hooks, harvest_layers: more hook points (every hook at every layer) harvested in
            the same forward pass when this module's cache is missing (None: this module's hooks /
            layers), so that the first trial of `-m lm.layer=4,8,12` fills all three caches.
        text_files: local `.txt`/`.md`/`.parquet` files or directories (`pkg://` allowed); or
            `dataset` (+ `dataset_config`, `dataset_split`, `text_column`): a hub dataset, streamed,
            which takes precedence over `text_files` when given.
        document_separator: between documents, `text` (a blank line), `eos` or `bos` (that token),
            or `auto` (`eos` for a hub dataset or parquet files, else `text`); see `rsae.data.text`.
        n_tokens: token positions to harvest (train + val), cut into `context_size` sequences.
        val_fraction: last fraction of the sequences held out for validation/evaluation.
        cache_dir: cache directory (reused across runs; a mismatching cache is an error); None:
            derived from the model, hook, layer and sizes under `cache_root`.
        storage_dtype: `bfloat16` or `float32` on disk; batches are always float32.
        exclude_special_tokens, prepend_bos: which positions are kept, and BOS at sequence starts.
        batch_size: rows per batch; seed: stream order; shuffle_buffer: rows shuffled together;
            block_rows: rows read contiguously (unit of the per-epoch shuffle and of the split
            across ranks and workers); num_workers, pin_memory (None: when CUDA is available).
        shuffle_device: `cpu` (batches gathered on the host) or `cuda` (each shuffle window is copied
            to the GPU once and batches are gathered there; needs num_workers=0).
        harvest_batch_size: sequences per forward pass (null: 8 on a CPU, 128 on a GPU); harvest_device: `auto`, `cpu`, `cuda`;
        shard_mb: shard size; verify_checksums: sha256 every shard when reusing a cache.
        d_in: expected width (None: read from the cache).
    """

    def __init__(self, name_or_path: str, cache_dir: str | None = None, cache_root: str = ".cache/rsae",
                 hook: str = "resid_post", layer: int | None = 0,
                 gguf_file: str | None = None, revision: str | None = None, lm_dtype: str = "float32",
                 text_files: Sequence[str] | None = None, dataset: str | None = None,
                 dataset_config: str | None = None, dataset_split: str = "train", text_column: str = "text",
                 n_tokens: int = 120_000, context_size: int = 128, val_fraction: float = 0.1,
                 storage_dtype: str = "bfloat16", exclude_special_tokens: bool = True, prepend_bos: bool = True,
                 batch_size: int = 4096, shuffle_buffer: int = 65536, block_rows: int = 1024, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool | None = None, harvest_batch_size: int | None = None,
                 harvest_device: str = "auto", shard_mb: float = 64, verify_checksums: bool = True,
                 d_in: int | None = None, progress: bool = True, shuffle_device: str = "cpu",
                 document_separator: str = "auto", harvest_hooks: Sequence[str] | None = None,
                 harvest_layers: Sequence[int] | None = None):
        super().__init__()
        if dataset is not None:
            text_files = None
        elif not text_files:
            raise ValueError("no text source: give text_files (local files) or dataset (a hub dataset name)")
        self.points = hook_points(hook, layer)  # this run's hook points (one, unless only harvesting)
        together = hook_points(harvest_hooks if harvest_hooks is not None else hook,
                               harvest_layers if harvest_layers is not None else layer)
        self.harvest_points = list(dict.fromkeys(self.points + together))
        if cache_dir is not None and len(self.harvest_points) > 1:
            raise ValueError(f"data.cache_dir names one cache, but {len(self.harvest_points)} hook points are harvested; "
                             "leave it null (each gets its own directory under data.cache_root)")
        try:
            separator = resolve_document_separator(document_separator, text_files, dataset)
        except FileNotFoundError:
            separator = "text"  # the missing file is reported by prepare_data
        self.cache_dirs = {p: Path(os.path.expanduser(str(cache_dir))) if cache_dir is not None else
                           default_cache_dir(cache_root, name_or_path, gguf_file, p[0], p[1], n_tokens, context_size,
                                             storage_dtype, separator) for p in self.harvest_points}
        self.cache_dir = self.cache_dirs[self.points[0]]
        self.hook, self.layer = (hook, layer) if len(self.points) > 1 else self.points[0]
        # Names the SAE export records (SAELens / TransformerLens conventions).
        self.model_name = str(name_or_path)
        self.hook_name = f"blocks.{self.layer}.hook_{self.hook}" if self.hook in HOOK_NAMES else self.hook
        self.hook_layer = self.layer
        self.context_size = int(context_size)
        self.lm_kwargs = {"name_or_path": str(name_or_path), "gguf_file": gguf_file, "revision": revision,
                          "dtype": lm_dtype}
        self.source = {"text_files": None if text_files is None else [str(f) for f in text_files],
                       "dataset": dataset, "dataset_config": dataset_config, "dataset_split": dataset_split,
                       "text_column": text_column, "document_separator": document_separator}
        self.shape = {"n_tokens": int(n_tokens), "context_size": int(context_size), "val_fraction": float(val_fraction),
                      "storage_dtype": storage_dtype, "exclude_special_tokens": exclude_special_tokens,
                      "prepend_bos": prepend_bos}
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shuffle_buffer, self.block_rows = int(shuffle_buffer), int(block_rows)
        self.num_workers = int(num_workers)
        if shuffle_device not in ("cpu", "cuda"):
            raise ValueError(f"data.shuffle_device must be 'cpu' or 'cuda', got {shuffle_device!r}")
        if shuffle_device == "cuda" and int(num_workers) != 0:
            raise ValueError("data.shuffle_device=cuda gathers batches on the GPU in the training process: "
                             f"set data.num_workers=0 (got {num_workers})")
        if shuffle_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("data.shuffle_device=cuda but CUDA is not available")
        self.shuffle_device = shuffle_device
        # Batches gathered on the GPU are not pinned (nothing left to copy).
        self.pin_memory = (torch.cuda.is_available() if pin_memory is None else bool(pin_memory)) and shuffle_device == "cpu"
        self.harvest_args = {"batch_size": None if harvest_batch_size is None else int(harvest_batch_size), "device": harvest_device,
                             "shard_mb": float(shard_mb), "verify_checksums": bool(verify_checksums),
                             "progress": bool(progress)}
        self.d_in: int | None = None if d_in is None else int(d_in)
        self.norm_scale: float | None = None
        self.ground_truth = None
        self.manifest: Manifest | None = None
        self._request: dict | None = None
        self._restored_position = 0
        self._lm: tuple | None = None

    # ---- cache ---------------------------------------------------------------------------------
    def _lm_request_args(self) -> dict:
        lm = self.lm_kwargs
        return dict(name_or_path=lm["name_or_path"], gguf_file=lm["gguf_file"], revision=lm["revision"],
                    lm_dtype=lm["dtype"], **self.source, **self.shape)

    def request(self) -> dict:
        """The manifest's `request` this module needs (hashes the model and text files once)."""
        if self._request is None:
            self._request = build_request(hook=self.points[0][0], layer=self.points[0][1], **self._lm_request_args())
        return self._request

    def prepare_data(self) -> None:
        """Harvest the cache if missing, in one pass with the other hook points of `harvest_points`
        whose caches are missing; otherwise validate it (mismatch or corruption is an error)."""
        if self.manifest is not None:  # already built or validated by this process
            return
        own = all((self.cache_dirs[p] / MANIFEST).is_file() for p in self.points)
        points = self.points if own else self.harvest_points
        lm = None if own else self.language_model(self.harvest_args["device"])
        manifests = harvest_many([(self.cache_dirs[p], *p) for p in points], d_in=self.d_in, lm=lm,
                                 **self._lm_request_args(), **self.harvest_args)
        self.manifest = manifests[0]
        self.d_in = self.manifest.d_in
        if lm is not None and next(lm[0].parameters()).device.type != "cpu":
            self._lm = None  # GPU memory goes to training; the spliced evaluation reloads it

    def language_model(self, device: str = "cpu") -> tuple:
        """`(model, tokenizer)` of `lm_kwargs`, loaded on first use and kept for this process."""
        if self._lm is None:
            from rsae.data.lm import load_lm

            kw = self.lm_kwargs
            self._lm = load_lm(kw["name_or_path"], kw["gguf_file"], kw["dtype"], device, kw["revision"])
        return self._lm

    def setup(self, stage: str | None = None) -> None:
        if len(self.points) > 1:
            raise ValueError(f"{len(self.points)} hook points ({', '.join(f'{h}@{l}' for h, l in self.points)}): a run "
                             "trains one SAE; harvest them with cache_only=true, train with -m (one trial each)")
        if self.manifest is None:  # ranks other than the one that ran prepare_data
            manifest = Manifest.load(self.cache_dir)
            manifest.check_request(self.request(), self.d_in)
            manifest.verify(checksums=False)
            self.manifest = manifest
        self.d_in = self.manifest.d_in
        self.norm_scale = math.sqrt(self.d_in) / self.manifest.mean_norm

    def _split(self, split: str) -> tuple[list[Path], list[int]]:
        if self.manifest is None:
            raise RuntimeError("call prepare_data() and setup() before asking for data")
        return self.manifest.shard_paths(split), [s["rows"] for s in self.manifest.shards(split)]

    # ---- loaders -------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def train_dataloader(self) -> StreamLoader:
        rank, world = self._rank_world()
        stream = TrainStream(*self._split("train"), batch_size=self.batch_size, seed=self.seed,
                             block_rows=self.block_rows, shuffle_buffer=self.shuffle_buffer, rank=rank,
                             world_size=world, start_batch=self.position(),
                             device="cuda" if self.shuffle_device == "cuda" else None,
                             reuse_buffers=REUSE_BUFFERS if self.num_workers == 0 and self._trainer_or_none() is not None else 0)
        loader = StreamLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        loader.position_fn = self.position
        return loader

    def val_dataloader(self):
        rank, world = self._rank_world()
        stream = ValStream(*self._split("val"), batch_size=self.batch_size, rank=rank, world_size=world)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0, pin_memory=self.pin_memory)

    # ---- resumption ----------------------------------------------------------------------------
    def position(self) -> int:
        """Training batches consumed so far on this rank.

        Taken from the trainer's count of processed batches, not from the loader: Lightning
        fetches a batch ahead (and workers prefetch more), so what the iterator produced overshoots.
        The trainer restores this count from a checkpoint, and it equals `load_state_dict`'s value.
        """
        return consumed_batches(self._trainer_or_none(), self._restored_position)

    def _stream_config(self) -> dict:
        _, world = self._rank_world()
        return {"seed": self.seed, "batch_size": self.batch_size, "block_rows": self.block_rows,
                "shuffle_buffer": self.shuffle_buffer, "world_size": world, "num_workers": self.num_workers}

    def state_dict(self) -> dict:
        return {"batches_consumed": self.position(), **self._stream_config()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_position = int(state_dict.get("batches_consumed", 0))
        current = self._stream_config()
        changed = [k for k in _STREAM_KEYS if k in state_dict and state_dict[k] != current[k]]
        if changed:
            warnings.warn(f"resuming the activation stream with changed {', '.join(changed)}: the data order "
                          "from here on differs from an uninterrupted run", stacklevel=2)

    # ---- evaluation ----------------------------------------------------------------------------
    def eval_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out token ids `[n_seq, context_size]` (int64) and keep-mask (bool, False at BOS etc.)."""
        return load_eval_tokens(self.cache_dir)
