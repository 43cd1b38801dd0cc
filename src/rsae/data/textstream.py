"""Token sequences read lazily from a text source and resumable at any sequence (for `data=live`).

The sequences are those `rsae.data.text.tokenize_sequences` cuts (documents tokenised without
special tokens, each followed by its separator, concatenated, cut into `context_size` tokens with
BOS first), but read as needed instead of all at once, so the text may be far larger than memory.
A *position* is `(document index, token offset)`: where the next sequence's first token lies in
the token list of that document (its separator included). Resuming at a position re-reads the
documents before it (cheap) but tokenises none of them.
"""

from __future__ import annotations

import itertools
from array import array
from bisect import bisect_right
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from rsae.data.text import DOCUMENT_SEPARATORS

Position = tuple[int, int]
_COMPACT = 1 << 16  # drop consumed tokens from the buffer past this many


class TokenSequences:
    """Sequences of `context_size` token ids from `documents()` (a fresh iterator over every
    document at each call), from any position on."""

    def __init__(self, tokenizer, documents: Callable[[], Iterable[str]], context_size: int, prepend_bos: bool = True,
                 document_separator: str = "text", tokenize_batch: int = 256):
        if context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {context_size}")
        if document_separator not in DOCUMENT_SEPARATORS:
            raise ValueError(f"document_separator must be one of {DOCUMENT_SEPARATORS}, got {document_separator!r}")
        self.tokenizer, self.documents, self.context_size = tokenizer, documents, int(context_size)
        self.bos = tokenizer.bos_token_id if prepend_bos else None
        self.body = self.context_size - (self.bos is not None)
        self.after: list[int] = []
        if document_separator != "text":
            token = getattr(tokenizer, f"{document_separator}_token_id", None)
            if token is None:
                raise ValueError(f"data.document_separator={document_separator}, but the tokenizer has no "
                                 f"{document_separator.upper()} token; use text or the other token")
            self.after = [token]
        self.tokenize_batch = int(tokenize_batch)

    def read(self, start: Position = (0, 0)) -> Iterator[tuple[torch.Tensor, Position]]:
        """`(sequence, position after it)` from `start` until the text ends (the last partial
        sequence is dropped); a sequence is `[context_size]` int64."""
        first_doc, first_offset = int(start[0]), int(start[1])
        buffer = array("q")
        head = 0
        segments: list[tuple[int, int, int]] = []  # (buffer index, document, token offset there)
        documents = itertools.islice(enumerate(self.documents()), first_doc, None)
        while batch := list(itertools.islice(documents, self.tokenize_batch)):
            texts = [text for _, text in batch] if self.after else [text + "\n\n" for _, text in batch]
            for (index, _), ids in zip(batch, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
                skip = first_offset if index == first_doc else 0
                segments.append((len(buffer), index, skip))
                buffer.extend((ids + self.after)[skip:])
            while len(buffer) - head >= self.body:
                body = np.frombuffer(buffer, dtype=np.int64, count=self.body, offset=head * 8).copy()  # no view: the buffer grows
                head += self.body
                yield self._sequence(body), self._position(segments, head)
            if head > _COMPACT:
                k = bisect_right(segments, head, key=lambda s: s[0]) - 1
                at, doc, offset = segments[k]
                segments[:] = [(0, doc, offset + head - at)] + [(i - head, d, o) for i, d, o in segments[k + 1:]]
                del buffer[:head]
                head = 0

    def _sequence(self, body: np.ndarray) -> torch.Tensor:
        out = torch.empty(self.context_size, dtype=torch.int64)
        if self.bos is not None:
            out[0] = self.bos
        out[self.context_size - self.body:] = torch.from_numpy(body)
        return out

    @staticmethod
    def _position(segments: list[tuple[int, int, int]], head: int) -> Position:
        at, doc, offset = segments[bisect_right(segments, head, key=lambda s: s[0]) - 1]
        return doc, offset + head - at

    def take(self, n: int, start: Position = (0, 0)) -> tuple[torch.Tensor, Position]:
        """The first `n` sequences from `start` as `[n, context_size]`, and the position after them."""
        rows, position = [], start
        for sequence, position in itertools.islice(self.read(start), n):
            rows.append(sequence)
        if len(rows) < n:
            raise ValueError(f"text too short: {len(rows)} sequences of {self.context_size} tokens, {n} needed")
        return torch.stack(rows), position
