"""data=live under DDP: each rank computes every world_size-th shuffle window, the ranks' windows
together are the single process's, and a 2-process run (gloo, CPU) resumes from a checkpoint with
exactly the weights of an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train
from rsae.data.live import LiveStream
from test_live import make_dm, sources  # noqa: F401  (the tiny LM and texts fixture)


def _stream(dm, rank: int, world: int) -> LiveStream:
    start = {"window": 0, "pass": 0, "position": list(dm._train_start), "rows_before": 0, "row_offset": 0}
    stream = LiveStream(dm._text, dm.window_rows, window_sequences=dm.window_sequences, batch_size=dm.batch_size,
                        seed=dm.seed, train_start=dm._train_start, start=lambda: dict(start))
    stream.rank, stream.world_size = rank, world
    return stream


def _rows(stream: LiveStream, n_batches: int) -> tuple[torch.Tensor, dict[int, tuple[int, int]]]:
    """The stream's first rows, and every window it computed for them: `(rows before, rows)`."""
    it, rows, windows = iter(stream), [], {}
    for _ in range(n_batches):
        rows.append(next(it))
        windows.update({e["window"]: (e["rows_before"], e["rows"]) for e in stream.log})  # (the log keeps the latest)
    return torch.cat(rows), windows


def test_ranks_take_alternate_windows_of_the_single_process_stream(sources):
    dm = make_dm(sources, text="short.md", batch_size=64)
    single = _stream(dm, 0, 1)
    rows, windows = _rows(single, 24)  # more than two passes over the short text: enough windows for both ranks
    for rank in (0, 1):
        stream = _stream(dm, rank, 2)
        got, computed = _rows(stream, 8)
        assert {w % 2 for w in computed} == {rank}
        mine = [w for w in sorted(windows) if w % 2 == rank]
        want = torch.cat([rows[windows[w][0]:windows[w][0] + windows[w][1]] for w in mine])
        assert len(want) >= len(got)
        assert torch.equal(got, want[:len(got)])


def test_a_checkpoint_of_two_ranks_does_not_resume_in_one_process(sources):
    dm = make_dm(sources, text="short.md", batch_size=64)
    state = {**dm.state_dict(), "world_size": 2, "ranks": [dm.state_dict()["stream"]] * 2}
    resumed = make_dm(sources, text="short.md", batch_size=64)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="written by 2 process"):
        next(iter(resumed.train_dataloader()))


def test_two_processes_train_live_and_resume_like_an_uninterrupted_run(sources, tmp_path):
    lm_dir, root = sources
    common = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data=live", f"lm.name_or_path={lm_dir}",
              "lm.layer=1", f"data.text_files=[{root / 'short.md'}]", "data.context_size=32", "data.val_tokens=256",
              "data.batch_size=64", "data.shuffle_buffer=256", "logger=csv", "sae.expansion_factor=2", "sae.k=4",
              "trainer.max_steps=16", "callbacks.downstream_eval.n_tokens=128")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_train(*common, "callbacks.model_checkpoint.every_n_train_steps=8", "callbacks.model_checkpoint.save_top_k=-1",
              f"hydra.run.dir={full}")
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["train/steps"] == 16 and "val/ce_spliced" in metrics
    mid = full / "checkpoints" / "step00000008.ckpt"
    state = torch.load(mid, weights_only=True)["LiveDataModule"]
    assert state["world_size"] == 2 and state["ranks"][0] == state["stream"]
    assert state["ranks"][0] != state["ranks"][1]  # each rank at its own place in its own windows
    run_train(*common, f"ckpt_path={mid}", f"hydra.run.dir={resumed}")
    a, b = (load_file(str(d / "sae" / "sae_weights.safetensors")) for d in (full, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_bare_cuda_device_means_this_processs_gpu(monkeypatch):
    from rsae.data.live import this_process_gpu

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert this_process_gpu(torch.device("cuda")) == torch.device("cuda", 1)  # DDP rank 1 loads its LM there
    assert this_process_gpu(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert this_process_gpu(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert this_process_gpu(torch.device("cuda")) == torch.device("cuda", 0)
