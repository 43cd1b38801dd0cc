"""DownstreamEval: the spliced-LM metrics logged during training under their canonical keys."""

import itertools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from rsae.data.synthetic import SyntheticDataModule
from rsae.data.tiny import make_tiny_lm
from rsae.lit import SAEModule
from rsae.lit.callbacks import DownstreamEval
from rsae.sae import TopKSAE

KEYS = ("val/ce_clean", "val/ce_spliced", "val/ce_zero", "val/delta_ce", "val/loss_recovered", "val/kl")


class _Endless(IterableDataset):
    def __init__(self, d):
        self.d = d

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in itertools.count():
            yield torch.randn(64, self.d, generator=g)


class TokenDataModule(L.LightningDataModule):
    """The part of ActivationDataModule's contract the callback uses."""

    def __init__(self, lm_dir, d_in):
        super().__init__()
        self.lm_kwargs = {"name_or_path": str(lm_dir), "gguf_file": None, "revision": None, "dtype": "float32"}
        self.hook, self.layer, self.d_in, self.norm_scale = "resid_post", 1, d_in, 1.0

    def train_dataloader(self):
        return DataLoader(_Endless(self.d_in), batch_size=None)

    def val_dataloader(self):
        return DataLoader([torch.randn(64, self.d_in)], batch_size=None)

    def eval_tokens(self):
        ids = torch.randint(4, 200, (5, 24), generator=torch.Generator().manual_seed(1))
        ids[:, 0] = 1
        return ids, ids != 1


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "llama", "llama", n_layers=2, d_model=32)


def trainer(callback, **kw):
    return L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, accelerator="cpu", callbacks=[callback], **kw)


def test_callback_logs_canonical_keys_at_validation(lm_dir):
    dm = TokenDataModule(lm_dir, 32)
    module = SAEModule(TopKSAE(d_in=32, d_sae=64, k=4), warmup_steps=1)
    module.set_activation_scale(2.0)
    cb = DownstreamEval(n_sequences=3, batch_size=2)
    t = trainer(cb)
    t.fit(module, datamodule=dm)
    results = t.validate(module, datamodule=dm, verbose=False)[0]
    for key in KEYS:
        assert key in results and math.isfinite(results[key]), key
    assert results["val/delta_ce"] == pytest.approx(results["val/ce_spliced"] - results["val/ce_clean"], abs=1e-5)
    assert "val/mse" in results  # the module's own metrics are still there
    assert cb._tokens[0].shape == (3, 24)


def test_callback_every_n_steps_logs_to_loggers(lm_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    dm = TokenDataModule(lm_dir, 32)
    module = SAEModule(TopKSAE(d_in=32, d_sae=64, k=4), warmup_steps=1)
    cb = DownstreamEval(n_sequences=2, every_n_steps=2, at_validation=False)
    t = L.Trainer(max_steps=4, val_check_interval=100, check_val_every_n_epoch=None, limit_val_batches=0,
                  logger=CSVLogger(tmp_path, name="csv", version=""), enable_checkpointing=False,
                  enable_progress_bar=False, accelerator="cpu", callbacks=[cb])
    t.fit(module, datamodule=dm)
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "val/loss_recovered" in text.splitlines()[0]
    assert module.sae.training is True  # restored after each evaluation


def test_callback_is_a_no_op_without_token_data():
    dm = SyntheticDataModule(d_in=16, n_features=32, batch_size=64, val_batches=1)
    module = SAEModule(TopKSAE(d_in=16, d_sae=32, k=4), warmup_steps=1)
    cb = DownstreamEval()
    t = trainer(cb)
    t.fit(module, datamodule=dm)
    assert not any(k in t.callback_metrics for k in KEYS)
    assert cb._disabled is not None


def test_held_out_sequences_follow_n_tokens_like_evaluate(lm_dir):
    """ceil(n_tokens / context) first held-out sequences, the rule of eval.n_tokens; the count is logged."""
    dm = TokenDataModule(lm_dir, 32)  # 5 held-out sequences of 24 tokens
    module = SAEModule(TopKSAE(d_in=32, d_sae=64, k=4), warmup_steps=1)
    cb = DownstreamEval(n_tokens=49, batch_size=2)  # 49 / 24 -> 3 sequences
    t = trainer(cb)
    t.fit(module, datamodule=dm)
    results = t.validate(module, datamodule=dm, verbose=False)[0]
    assert cb._tokens[0].shape == (3, 24) and results["val/n_sequences"] == 3
    cb = DownstreamEval(n_tokens=10**6)
    trainer(cb).fit(SAEModule(TopKSAE(d_in=32, d_sae=64, k=4), warmup_steps=1), datamodule=dm)
    assert cb._tokens[0].shape == (5, 24)  # all of them when the cache holds fewer


def test_the_data_modules_language_model_is_reused(lm_dir, monkeypatch):
    """A data module that already holds the LM (the harvest's) hands it over: no second load."""
    import rsae.data.lm as lm_module
    from rsae.data.lm import load_lm

    shared = load_lm(str(lm_dir))
    dm = TokenDataModule(lm_dir, 32)
    dm.language_model = lambda device="cpu": shared

    def no_load(*args, **kwargs):
        raise AssertionError("the callback loaded the LM again")

    monkeypatch.setattr(lm_module, "load_lm", no_load)
    cb = DownstreamEval(n_sequences=2)
    t = trainer(cb)
    t.fit(module := SAEModule(TopKSAE(d_in=32, d_sae=64, k=4), warmup_steps=1), datamodule=dm)
    t.validate(module, datamodule=dm, verbose=False)
    assert cb._lm is shared[0]


def test_spliced_pass_shows_a_progress_bar_with_the_trainers(lm_dir, capsys):
    from rsae.lit.callbacks import step_progress_bar

    dm = TokenDataModule(lm_dir, 32)
    module = SAEModule(TopKSAE(d_in=32, d_sae=64, k=4), warmup_steps=1)
    t = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_model_summary=False,
                  num_sanity_val_steps=0, accelerator="cpu", callbacks=[DownstreamEval(n_sequences=2), step_progress_bar(True)])
    t.fit(module, datamodule=dm)
    t.validate(module, datamodule=dm, verbose=False)
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "spliced CE" in shown
    assert "Training" in shown and "4/4" in shown and "Epoch" not in shown  # steps against max_steps
