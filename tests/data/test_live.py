"""data=live: the LM in the loop on a tiny random Llama. Text positions, the rows and their order,
the held-out slice, the norm estimate, resumption (through Lightning and through train.py)."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train
from rsae.data.hooks import run_to_hook
from rsae.data.live import LiveDataModule
from rsae.data.text import paragraphs, tokenize_sequences
from rsae.data.textstream import TokenSequences
from rsae.data.tiny import make_tiny_lm, sample_text

CTX = 32


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    (root / "text.md").write_text(sample_text(300, seed=4))
    (root / "short.md").write_text(sample_text(25, seed=5))  # a pass over it is about 10 batches of 64
    return make_tiny_lm(root / "lm", "llama", vocab_size=400), root


def make_dm(sources, text="text.md", setup=True, **overrides):
    lm_dir, root = sources
    args = dict(name_or_path=str(lm_dir), hook="resid_post", layer=1, text_files=[str(root / text)], context_size=CTX,
                val_tokens=8 * CTX, batch_size=62, shuffle_buffer=8 * CTX, seed=0)
    dm = LiveDataModule(**{**args, **overrides})
    if setup:
        dm.prepare_data(), dm.setup("fit")
    return dm


def reference_tokens(dm, text="text.md"):
    tokenizer = dm.language_model()[1]
    docs = paragraphs((Path(dm.source["text_files"][0])).read_text())
    return tokenize_sequences(tokenizer, docs, CTX, 10**9)


def multiset(rows: torch.Tensor) -> torch.Tensor:
    """The rows in a canonical order (sorted by a random projection)."""
    key = rows.double() @ torch.randn(rows.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return rows[key.argsort()]


@pytest.fixture(scope="module")
def dm(sources):
    return make_dm(sources)


def test_token_sequences_match_the_cached_tokenisation_and_resume_anywhere():
    text = sample_text(3000, seed=3)
    from rsae.data.tiny import train_tokenizer

    tokenizer = train_tokenizer(text, 300)
    docs = list(paragraphs(text))
    for separator in ("text", "eos"):
        expected = tokenize_sequences(tokenizer, docs, CTX, 10**9, True, separator)
        sequences = TokenSequences(tokenizer, lambda: iter(docs), CTX, True, separator)
        read = list(sequences.read())
        assert torch.equal(torch.stack([s for s, _ in read]), expected)  # the buffer is compacted on the way
        for k in (0, 9, 2500, len(read) - 2):  # a position is (document, offset): resume there exactly
            rest = torch.stack([s for s, _ in sequences.read(read[k][1])])
            assert torch.equal(rest, expected[k + 1:])


def test_rows_are_the_models_activations_window_by_window(dm):
    model, _ = dm.language_model()
    tokens = reference_tokens(dm)
    window = tokens[8:16]  # after the 8 held-out sequences; the text has no special tokens but BOS
    with torch.no_grad():
        expected = run_to_hook(model, "resid_post", 1, input_ids=window)[:, 1:].reshape(-1, 32).to(torch.bfloat16).float()
    assert len(expected) == 248 == 4 * dm.batch_size  # four batches of 62: one window
    batches = [b for _, b in zip(range(8), dm.train_dataloader())]
    assert all(b.shape == (62, 32) and b.dtype == torch.float32 for b in batches)
    torch.testing.assert_close(multiset(torch.cat(batches[:4])), multiset(expected), rtol=0, atol=1e-6)
    assert not torch.equal(torch.cat(batches[:4]), expected)  # shuffled
    assert dm.mean_norm == pytest.approx(expected.norm(dim=1).mean().item(), rel=1e-5)  # from the first window
    assert dm.norm_scale == pytest.approx(math.sqrt(32) / dm.mean_norm)


def test_the_held_out_slice_is_the_first_sequences(dm):
    model, _ = dm.language_model()
    ids, keep = dm.eval_tokens()
    assert torch.equal(ids, reference_tokens(dm)[:8]) and not keep[:, 0].any() and keep[:, 1:].all()
    val = torch.cat(list(dm.val_dataloader()))
    with torch.no_grad():
        expected = run_to_hook(model, "resid_post", 1, input_ids=ids)[keep].to(torch.bfloat16).float()
    torch.testing.assert_close(val, expected, rtol=0, atol=1e-6)  # in order


def test_passes_over_the_text_restart_after_the_held_out_slice(sources):
    dm = make_dm(sources, text="short.md")
    tokens = reference_tokens(dm)
    seen = [s for _, (s, _, _) in zip(range(2 * len(tokens)), dm._stream.sequences(0, dm._train_start))]
    per_pass = len(tokens) - 8
    assert torch.equal(torch.stack(seen[:per_pass]), tokens[8:])
    assert torch.equal(torch.stack(seen[per_pass:2 * per_pass]), tokens[8:])  # never the held-out sequences


def test_batches_are_deterministic_for_a_seed(dm, sources):
    first = [b for _, b in zip(range(6), dm.train_dataloader())]
    again = [b for _, b in zip(range(6), make_dm(sources).train_dataloader())]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = next(iter(make_dm(sources, seed=1).train_dataloader()))
    assert not torch.equal(first[0], other)


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 32)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return (self.layer(batch) - batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(dm, root, max_steps, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = Recorder()
    every_5 = ModelCheckpoint(dirpath=root / "steps", filename="s{step}", auto_insert_metric_name=False,
                              every_n_train_steps=5, save_top_k=-1)
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=4, limit_val_batches=1, logger=False, callbacks=[every_5],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


def test_resume_from_a_checkpoint_continues_the_stream_exactly(sources, tmp_path):
    full = _fit(make_dm(sources, text="short.md", batch_size=64), tmp_path / "a", max_steps=23)  # 2+ passes
    assert len(full) == 23
    for step in (5, 10, 15, 20):  # mid-window and across passes
        ckpt = tmp_path / "a" / "steps" / f"s{step}.ckpt"
        state = torch.load(ckpt, weights_only=True)["LiveDataModule"]
        assert state["batches_consumed"] == step and state["mean_norm"] > 0
        resumed = _fit(make_dm(sources, text="short.md", batch_size=64), tmp_path / f"b{step}", 23, ckpt_path=ckpt)
        assert len(resumed) == 23 - step
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[step:]))
    assert state["stream"]["pass"] >= 1


def test_a_restored_mean_norm_is_not_estimated_again(dm, sources, monkeypatch):
    state = {**dm.state_dict(), "mean_norm": 1.5}
    restored = make_dm(sources, setup=False)
    restored.restore_before_setup(state)
    calls = []
    real = LiveDataModule.window_rows
    monkeypatch.setattr(LiveDataModule, "window_rows", lambda self, t: calls.append(len(t)) or real(self, t))
    restored.prepare_data(), restored.setup("fit")
    assert calls == [8]  # the held-out slice only, no first window
    assert restored.norm_scale == pytest.approx(math.sqrt(32) / 1.5)
    with pytest.warns(UserWarning, match="batch_size"):
        restored.load_state_dict({**state, "batch_size": 7})


def test_train_cli_runs_live_and_resumes_like_an_uninterrupted_run(sources, tmp_path):
    lm_dir, root = sources
    common = ("data=live", f"lm.name_or_path={lm_dir}", "lm.layer=1", f"data.text_files=[{root / 'short.md'}]",
              "data.context_size=32", "data.val_tokens=256", "data.batch_size=64", "data.shuffle_buffer=256",
              "logger=csv", "sae.expansion_factor=2", "sae.k=4", "trainer.max_steps=20",
              "callbacks.downstream_eval.n_tokens=128")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_train(*common, "callbacks.model_checkpoint.every_n_train_steps=10", "callbacks.model_checkpoint.save_top_k=-1",
              f"hydra.run.dir={full}")
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["train/steps"] == 20
    assert "val/fvu" in metrics and "val/ce_spliced" in metrics  # validation and the spliced LM on held-out tokens
    mid = full / "checkpoints" / "step00000010.ckpt"
    run_train(*common, f"ckpt_path={mid}", f"hydra.run.dir={resumed}")
    a, b = (load_file(str(d / "sae" / "sae_weights.safetensors")) for d in (full, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    at_10 = torch.load(mid, weights_only=True)
    assert at_10["LiveDataModule"]["mean_norm"] == pytest.approx(math.sqrt(32) / float(at_10["state_dict"]["act_scale"]))
