"""data.document_separator through the activation cache: harvested tokens, the cache's identity
and its default directory."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rsae.data.activations import ActivationDataModule
from rsae.data.cache import CacheMismatchError
from rsae.data.lm import load_tokenizer
from rsae.data.tiny import make_tiny_lm, sample_text


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sep")
    stories = [p.replace("\n", " ") for p in sample_text(400, seed=5).split("\n\n") if p.strip()]
    pq.write_table(pa.table({"text": stories}), root / "stories.parquet")
    return make_tiny_lm(root / "lm", "llama", vocab_size=400), root


def make_dm(sources, **overrides):
    lm_dir, root = sources
    args = dict(name_or_path=str(lm_dir), cache_root=str(root / "caches"), hook="resid_post", layer=1,
                text_files=[str(root / "stories.parquet")], n_tokens=2048, context_size=32, val_fraction=0.25,
                batch_size=64, block_rows=32, shuffle_buffer=256, shard_mb=0.05, progress=False)
    return ActivationDataModule(**{**args, **overrides})


def test_parquet_rows_are_separated_by_eos_by_default(sources):
    dm = make_dm(sources)
    dm.prepare_data()
    tok = load_tokenizer(str(sources[0]))
    ids, keep = dm.eval_tokens()
    assert (ids[:, 1:] == tok.eos_token_id).any()  # document boundaries inside the sequences
    assert not keep[ids == tok.eos_token_id].any()  # and no activation rows for them
    assert dm.manifest.data["request"]["text"]["document_separator"] == "eos"
    assert dm.manifest.data["args"]["document_separator"] == "eos"
    assert dm.cache_dir.name.endswith("-eos")


def test_separators_get_their_own_caches_and_never_reuse_another(sources):
    text = make_dm(sources, document_separator="text")
    text.prepare_data()
    tok = load_tokenizer(str(sources[0]))
    ids, _ = text.eval_tokens()
    assert not (ids[:, 1:] == tok.eos_token_id).any()
    eos = make_dm(sources, document_separator="eos")
    assert text.cache_dir != eos.cache_dir  # the default directories differ
    # the same directory asked for another separator is a one-line mismatch, never a silent reuse
    with pytest.raises(CacheMismatchError, match="text"):
        make_dm(sources, document_separator="bos", cache_dir=str(text.cache_dir)).prepare_data()


def test_plain_text_keeps_its_blank_lines_and_its_cache_identity(sources, tmp_path):
    (tmp_path / "book.txt").write_text(sample_text(200, seed=6))
    dm = make_dm(sources, text_files=[str(tmp_path / "book.txt")], cache_root=str(tmp_path / "caches"))
    assert not dm.cache_dir.name.endswith(("-eos", "-bos", "-text"))
    dm.prepare_data()
    # a .txt book is one text: the request is the one earlier caches recorded (no separator key)
    assert "document_separator" not in dm.manifest.data["request"]["text"]
    ids, _ = dm.eval_tokens()
    tok = load_tokenizer(str(sources[0]))
    assert not torch.isin(ids[:, 1:], torch.tensor([tok.eos_token_id, tok.bos_token_id])).any()
