"""Training without a disk cache (`data=live`): the LM runs in the loop on text, its activations go
into a shuffle buffer (on the GPU when there is one) and batches come out of it.

Contract (as `rsae.data.activations.ActivationDataModule`'s, so the training job, the module and
the spliced-LM callback use it unchanged):

* after `setup("fit")`: `d_in`, `norm_scale` (`sqrt(d_in) / mean_norm`), `ground_truth = None`.
* `train_dataloader()`: endless float32 `[batch_size, d_in]` batches on `buffer_device`.
* `val_dataloader()`: the held-out slice (the text's first `val_tokens` tokens), in order.
* `state_dict()` / `load_state_dict()`: where the stream is (window, row in it, text position,
  pass over the text) and `mean_norm`; a resumed run continues with exactly the batches the
  uninterrupted run had.
* `eval_tokens()`, `lm_kwargs`, `hook`, `layer`, `language_model()`: the spliced evaluation.

The order. The text (after the held-out sequences) is read as one endless sequence stream: at
its end a new pass begins right after the held-out sequences. Window `w` is the next
`ceil(shuffle_buffer / context_size)` sequences; the LM computes their activations at kept
positions (no BOS, padding or special tokens: `exclude_special_tokens`), rounded to
`storage_dtype` as a cache would store them. A window's rows are shuffled by a permutation seeded
by `(seed, w)` and the windows' rows, concatenated, are cut into batches (a batch may span two
windows). Everything is a function of the text, the model and the seed: no RNG state to save.
Under DDP rank r computes the windows w with w % world_size == r and reads past the others' text;
a checkpoint holds every rank's place, and each rank resumes from its own.

Normalisation. There is no manifest, so `mean_norm` (the mean row norm that a cache's manifest
holds for its training split) is estimated from the first window's rows in `setup`; it is saved in
the data module's state and with the module's `act_scale` in every checkpoint, and a resumed run
takes it from there (`restore_before_setup`) instead of estimating it again.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from rsae.data.activations import consumed_batches
from rsae.data.cache import storage_dtype as parse_storage_dtype
from rsae.data.cache_write import check_finite
from rsae.data.hooks import HOOK_NAMES, run_to_hook
from rsae.data.lm import resolve_device
from rsae.data.text import expand_text_files, iter_file_documents, iter_hub_documents, keep_mask, resolve_document_separator
from rsae.data.textstream import TokenSequences

log = logging.getLogger(__name__)
_STATE_KEYS = ("seed", "batch_size", "shuffle_buffer", "context_size", "val_tokens")
_LOG_BATCHES = 4  # rows remembered for state_dict, in batches (the trainer is at most a batch or two behind)


def this_process_gpu(device: torch.device) -> torch.device:
    """A bare `cuda` means this process's GPU. Under DDP the launched processes load the LM (in
    `setup`) before the trainer picks their GPU, so take it from LOCAL_RANK."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


class LiveStream(IterableDataset):
    """Endless batches from `window_rows(tokens) -> rows` over the sequences of `text`, from the
    stream state `start()` returns when iteration begins. Every window it computes is recorded in
    `log` (its state, rows before it, its row count, the state after it). Under DDP each rank
    computes every `world_size`-th window and reads past the others' sequences; a state's
    `rows_before` counts this rank's rows, and its window may be another rank's (then skipped)."""

    def __init__(self, text: TokenSequences, window_rows: Callable[[torch.Tensor], torch.Tensor], *, window_sequences: int,
                 batch_size: int, seed: int, train_start: tuple[int, int], start: Callable[[], dict],
                 ready: dict[int, torch.Tensor] | None = None):
        self.text, self.window_rows = text, window_rows
        self.window_sequences, self.batch_size, self.seed = int(window_sequences), int(batch_size), int(seed)
        self.train_start, self.start = tuple(train_start), start
        self.ready = ready if ready is not None else {}  # windows computed already (the first, in setup)
        self.log: list[dict] = []
        self.rank, self.world_size = 0, 1  # under DDP, rank r computes the windows w with w % world_size == r

    def sequences(self, pass_: int, position: tuple[int, int]) -> Iterator[tuple[torch.Tensor, int, tuple[int, int]]]:
        """`(sequence, pass, position of the sequence)` from there on, pass after pass."""
        while True:
            any_read = False
            for sequence, after in self.text.read(position):
                yield sequence, pass_, position
                position, any_read = after, True
            if not any_read:
                raise ValueError("the text holds no training sequence after the held-out tokens (data.val_tokens)")
            pass_, position = pass_ + 1, self.train_start
            log.info("data=live: pass %d over the text begins (activations repeat from here)", pass_ + 1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        state = self.start()
        window, rows_before, offset = state["window"], state["rows_before"], state["row_offset"]
        stream = self.sequences(state["pass"], tuple(state["position"]))
        carry: torch.Tensor | None = None
        nxt = next(stream)
        while True:
            first_pass, first_position = nxt[1], nxt[2]
            tokens = [nxt[0]] + [s for s, _, _ in (next(stream) for _ in range(self.window_sequences - 1))]
            nxt = next(stream)
            rows = self.ready.pop(window, None)
            if window % self.world_size != self.rank:  # another rank's window: its text is only read past
                window, offset = window + 1, 0
                continue
            rows = self.window_rows(torch.stack(tokens)) if rows is None else rows
            n = len(rows)
            # keep the windows that cover the last _LOG_BATCHES batches (a batch may span many windows)
            while len(self.log) > 1 and rows_before - self.log[1]["rows_before"] >= _LOG_BATCHES * self.batch_size:
                self.log.pop(0)
            self.log = self.log + [{
                "window": window, "pass": first_pass, "position": list(first_position), "rows_before": rows_before,
                "rows": n, "next": {"window": window + 1, "pass": nxt[1], "position": list(nxt[2]),
                                    "rows_before": rows_before + n, "row_offset": 0}}]
            order = torch.from_numpy(np.random.default_rng([self.seed, window]).permutation(n)[offset:]).to(rows.device)
            at = 0
            if carry is not None:  # complete the batch the previous window began
                at = min(len(order), self.batch_size - len(carry))
                carry = torch.cat([carry, rows.index_select(0, order[:at]).float()])
                if len(carry) == self.batch_size:
                    yield carry
                    carry = None
            if carry is None:
                while at + self.batch_size <= len(order):
                    yield rows.index_select(0, order[at:at + self.batch_size]).float()
                    at += self.batch_size
                if at < len(order):
                    carry = rows.index_select(0, order[at:]).float()
            window, rows_before, offset = window + 1, rows_before + n, 0

    def state_at(self, row: int) -> dict | None:
        """The stream state at row `row` of the stream, from the windows computed lately (None if
        none holds it)."""
        for entry in reversed(self.log):
            if entry["rows_before"] <= row < entry["rows_before"] + entry["rows"]:
                return {k: entry[k] for k in ("window", "pass", "position", "rows_before")} | \
                    {"row_offset": row - entry["rows_before"]}
            if row == entry["rows_before"] + entry["rows"]:
                return dict(entry["next"])
        return None


class _ValBatches(IterableDataset):
    def __init__(self, rows: torch.Tensor, batch_size: int):
        self.rows, self.batch_size = rows, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for lo in range(0, len(self.rows), self.batch_size):
            yield self.rows[lo:lo + self.batch_size].float()


class LiveDataModule(L.LightningDataModule):
    """Activations of `name_or_path` at `hook`/`layer` on `text_files` (or hub `dataset`), computed
    while training. Arguments as `ActivationDataModule`'s where they share a name, and:

    Args:
        val_tokens: held-out tokens, the text's first `ceil(val_tokens / context_size)` sequences
            (validation, spliced evaluation); training reads the text after them.
        shuffle_buffer: rows per shuffle window (`ceil(shuffle_buffer / context_size)` sequences).
        storage_dtype: the buffer's dtype (`bfloat16`: the values a bf16 cache would hold, half the
            memory); batches are float32.
        lm_batch_size: sequences per LM forward pass; lm_device: `auto` (CUDA when available), `cpu`,
            `cuda`; buffer_device: where the window lives and batches are gathered (`auto`: the LM's).
    """

    def __init__(self, name_or_path: str, hook: str = "resid_post", layer: int | None = 0, gguf_file: str | None = None,
                 revision: str | None = None, lm_dtype: str = "float32", text_files: Sequence[str] | None = None,
                 dataset: str | None = None, dataset_config: str | None = None, dataset_split: str = "train",
                 text_column: str = "text", document_separator: str = "auto", context_size: int = 128,
                 val_tokens: int = 12288, exclude_special_tokens: bool = True, prepend_bos: bool = True,
                 storage_dtype: str = "bfloat16", batch_size: int = 4096, shuffle_buffer: int = 65536, seed: int = 0,
                 lm_batch_size: int = 8, lm_device: str = "auto", buffer_device: str = "auto", d_in: int | None = None):
        super().__init__()
        if dataset is not None:
            text_files = None
        elif not text_files:
            raise ValueError("no text source: give data.text_files (local files) or data.dataset (a hub dataset name)")
        if not isinstance(hook, str) or not (layer is None or isinstance(layer, int)):
            raise ValueError(f"data=live trains on one hook point, got hook={hook}, layer={layer}")
        self.hook, self.layer = hook, layer
        self.model_name = str(name_or_path)
        self.hook_name = f"blocks.{layer}.hook_{hook}" if hook in HOOK_NAMES else hook
        self.hook_layer, self.context_size = layer, int(context_size)
        self.lm_kwargs = {"name_or_path": str(name_or_path), "gguf_file": gguf_file, "revision": revision, "dtype": lm_dtype}
        self.source = {"text_files": None if text_files is None else [str(f) for f in text_files], "dataset": dataset,
                       "dataset_config": dataset_config, "dataset_split": dataset_split, "text_column": text_column}
        self.document_separator, self.prepend_bos = document_separator, bool(prepend_bos)
        self.exclude_special_tokens = bool(exclude_special_tokens)
        self.store = parse_storage_dtype(storage_dtype)
        self.val_tokens, self.batch_size, self.seed = int(val_tokens), int(batch_size), int(seed)
        self.shuffle_buffer, self.lm_batch_size = int(shuffle_buffer), int(lm_batch_size)
        self.window_sequences = max(1, math.ceil(self.shuffle_buffer / self.context_size))
        self.lm_device = this_process_gpu(resolve_device(lm_device))
        if buffer_device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"data.buffer_device must be auto, cpu or cuda, got {buffer_device!r}")
        for key, value in (("lm_device", lm_device), ("buffer_device", buffer_device)):
            if str(value).startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"data.{key}={value} but CUDA is not available here; use cpu or auto")
        self.buffer_device = self.lm_device if buffer_device == "auto" else this_process_gpu(resolve_device(buffer_device))
        self.d_in: int | None = None if d_in is None else int(d_in)
        self.norm_scale: float | None = None
        self.mean_norm: float | None = None
        self.ground_truth = None
        self._lm: tuple | None = None
        self._text: TokenSequences | None = None
        self._val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # ids, keep, rows
        self._train_start: tuple[int, int] | None = None
        self._ready: dict[int, torch.Tensor] = {}
        self._stream: LiveStream | None = None
        self._restored: dict | None = None
        self._restored_position = 0

    # ---- the model and the text -------------------------------------------------------------
    def language_model(self, device: str | torch.device | None = None) -> tuple:
        """`(model, tokenizer)`, loaded once on `lm_device` (the spliced evaluation uses it too)."""
        if self._lm is None:
            from rsae.data.lm import load_lm

            kw = self.lm_kwargs
            self._lm = load_lm(kw["name_or_path"], kw["gguf_file"], kw["dtype"], self.lm_device, kw["revision"])
        return self._lm

    def _documents(self) -> Callable[[], Iterator[str]]:
        s = self.source
        if s["dataset"] is not None:
            return lambda: iter_hub_documents(s["dataset"], s["dataset_config"], s["dataset_split"], s["text_column"])
        files = expand_text_files(s["text_files"])
        return lambda: iter_file_documents(files)

    def window_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Activations at the kept positions of `tokens` `[n, context_size]`, in the storage dtype,
        on the buffer device."""
        model, tokenizer = self.language_model()
        device = next(model.parameters()).device  # (the spliced evaluation may have moved it)
        keep = keep_mask(tokens, tokenizer, self.exclude_special_tokens)
        out = []
        with torch.no_grad():
            for lo in range(0, len(tokens), self.lm_batch_size):
                acts = run_to_hook(model, self.hook, self.layer, input_ids=tokens[lo:lo + self.lm_batch_size].to(device))
                rows = acts[keep[lo:lo + self.lm_batch_size].to(acts.device)].to(self.store)
                check_finite(rows, f"the live activations ({self.hook} at layer {self.layer})")
                out.append(rows.to(self.buffer_device))
        return torch.cat(out)

    # ---- Lightning hooks --------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to prepare on disk; a missing text file is reported here already."""
        if self.source["dataset"] is None:
            expand_text_files(self.source["text_files"])

    def setup(self, stage: str | None = None) -> None:
        if self._text is not None:
            return
        _, tokenizer = self.language_model()
        separator = resolve_document_separator(self.document_separator, self.source["text_files"], self.source["dataset"])
        self._text = TokenSequences(tokenizer, self._documents(), self.context_size, self.prepend_bos, separator)
        n_val = max(1, math.ceil(self.val_tokens / self.context_size))
        ids, self._train_start = self._text.take(n_val)
        keep = keep_mask(ids, tokenizer, self.exclude_special_tokens)
        self._val = (ids, keep, self.window_rows(ids))
        width = self._val[2].shape[1]
        if self.d_in is not None and self.d_in != width:
            raise ValueError(f"hook {self.hook!r} at layer {self.layer} has d_in={width}, but d_in={self.d_in} was requested")
        self.d_in = width
        self._stream = LiveStream(self._text, self.window_rows, window_sequences=self.window_sequences,
                                  batch_size=self.batch_size, seed=self.seed, train_start=self._train_start,
                                  start=self._start_state, ready=self._ready)
        if self.mean_norm is None:  # not restored from a checkpoint: estimate it from the first window
            sequences = self._stream.sequences(0, self._train_start)
            first = torch.stack([next(sequences)[0] for _ in range(self.window_sequences)])
            self._ready[0] = self.window_rows(first)
            norms = self._ready[0].float().norm(dim=1).double()
            self.mean_norm = float(norms.mean())
            log.info("data=live: mean activation norm %.4g from the first window (%d rows)", self.mean_norm, len(norms))
        self.norm_scale = math.sqrt(self.d_in) / self.mean_norm

    def restore_before_setup(self, state: dict | None) -> None:
        """Take `mean_norm` (and the stream state) from a checkpoint's data-module state before
        `setup`, which then does not estimate it again."""
        if state:
            self.load_state_dict(state)

    def train_dataloader(self) -> DataLoader:
        """The stream, in the training process (the LM runs there): each iteration starts at the
        trainer's position."""
        if self._stream is None:
            raise RuntimeError("call setup() before asking for data")
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self._stream.rank, self._stream.world_size = int(trainer.global_rank), int(trainer.world_size)
        return DataLoader(self._stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_ValBatches(self._val[2], self.batch_size), batch_size=None, num_workers=0)

    def eval_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out token ids `[n_seq, context_size]` (int64) and keep-mask."""
        return self._val[0], self._val[1]

    # ---- resumption -------------------------------------------------------------------------
    def position(self) -> int:
        """Training batches the trainer has consumed (what a checkpoint records)."""
        return consumed_batches(getattr(self, "trainer", None), self._restored_position)

    def _start_state(self) -> dict:
        position = self.position()
        if self._restored is not None and position == self._restored_position:
            rank, world = self._stream.rank, self._stream.world_size
            saved = self._restored.get("world_size", 1)
            if saved != world:
                raise ValueError(f"this data=live checkpoint was written by {saved} process(es); resume it with "
                                 f"{saved} (this run has {world}), or start afresh")
            return dict(self._restored["ranks"][rank]) if world > 1 else dict(self._restored["stream"])
        state = self._stream.state_at(position * self.batch_size)
        if state is None:
            if position != 0:
                raise RuntimeError(f"data=live cannot place batch {position}: the stream did not produce it")
            state = {"window": 0, "pass": 0, "position": list(self._train_start), "rows_before": 0, "row_offset": 0}
        return state

    def _config(self) -> dict:
        return {k: getattr(self, k) for k in _STATE_KEYS}

    def state_dict(self) -> dict:
        """Under DDP every rank calls this when a checkpoint is written (only rank 0 saves it), so
        the ranks' stream states are gathered into it: each rank resumes from its own."""
        if self._text is None:
            return {}
        state = {"batches_consumed": self.position(), "stream": self._start_state(), "mean_norm": self.mean_norm,
                 **self._config()}
        if self._stream.world_size > 1:
            ranks: list = [None] * self._stream.world_size
            torch.distributed.all_gather_object(ranks, state["stream"])
            state.update(world_size=self._stream.world_size, ranks=ranks)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self._restored_position = int(state_dict.get("batches_consumed", 0))
        self._restored = {"stream": state_dict["stream"], "world_size": int(state_dict.get("world_size", 1)),
                          "ranks": state_dict.get("ranks")} if "stream" in state_dict else None
        if state_dict.get("mean_norm") is not None:
            self.mean_norm = float(state_dict["mean_norm"])
        changed = [k for k in _STATE_KEYS if k in state_dict and state_dict[k] != self._config()[k]]
        if changed:
            warnings.warn(f"resuming data=live with changed {', '.join(changed)}: the batches from here on differ "
                          "from an uninterrupted run", stacklevel=2)
