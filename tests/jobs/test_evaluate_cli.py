"""End-to-end runs of evaluate.py on a tiny random GPT-2 (built locally) and on synthetic data,
with the numbers checked against independent computations."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train
from rsae.data.tiny import make_tiny_lm, sample_text
from rsae.io.saelens import load_sae, save_sae
from rsae.sae import TopKSAE

LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    text = sample_text(400, seed=1) + "\n\nIn 1603 there were 12 kings.\nAnd 7 queens, 40 lords.\n"
    (root / "text.txt").write_text(text)
    lm = make_tiny_lm(root / "lm", "gpt2", text=text, vocab_size=400, n_layers=2, d_model=32)
    sae = TopKSAE(d_in=32, d_sae=128, k=8, init_seed=3)
    save_sae(sae, root / "sae")
    narrow = TopKSAE(d_in=16, d_sae=64, k=4)
    save_sae(narrow, root / "sae16")
    data = (f"lm.name_or_path={lm}", f"lm.layer={LAYER}", "lm.hook=resid_post", "data=activations",
            f"data.text_files=[{root / 'text.txt'}]", "data.n_tokens=12000", "data.context_size=64",
            f"data.cache_dir={root / 'cache'}", "data.val_fraction=0.25")
    return root, lm, data


def test_evaluate_writes_metrics_that_match_independent_computations(setup):
    root, lm, data = setup
    run = root / "run"
    run_train(f"sae_path={root / 'sae'}", *data, "eval.n_tokens=1600", "eval.n_random=2", "logger=csv",
              f"hydra.run.dir={run}", script="evaluate.py")
    out = json.loads((run / "eval.json").read_text())
    assert out["status"] == "ok"
    for key in ("mse", "fvu", "explained_variance", "l0", "alive", "dense", "l2_ratio",
                "ce_clean", "ce_spliced", "ce_zero", "delta_ce", "loss_recovered", "kl"):
        assert isinstance(out[key], float), key
    assert out["l0"] == pytest.approx(8.0)
    assert out["delta_ce"] == pytest.approx(out["ce_spliced"] - out["ce_clean"])
    assert out["info"]["sequences"] == 25  # ceil(1600 / 64)

    # CE: the model's own labels= loss on the evaluated sequences, and a hand-made zero ablation.
    from transformers import AutoModelForCausalLM

    tokens = load_file(str(run / "eval_tokens.safetensors"))
    ids, keep = tokens["input_ids"], tokens["keep"]
    assert ids.shape == (25, 64) and not keep[:, 0].any() and keep[:, 1:].all()
    model = AutoModelForCausalLM.from_pretrained(str(lm)).eval()
    block = model.transformer.h[LAYER]
    with torch.no_grad():
        assert out["ce_clean"] == pytest.approx(float(model(input_ids=ids, labels=ids).loss), rel=1e-5)
        handle = block.register_forward_hook(lambda m, a, o: (o[0] * (~keep)[..., None], *o[1:])
                                             if isinstance(o, tuple) else o * (~keep)[..., None])
        try:
            ce_zero = float(model(input_ids=ids, labels=ids).loss)
        finally:
            handle.remove()
    assert out["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)

    # Reconstruction metrics: the cache's held-out rows of those sequences, by hand.
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    rows = torch.cat([load_file(str(root / "cache" / s["file"]))["acts"] for s in manifest["splits"]["val"]["shards"]])
    x = rows[: int(keep.sum())].float()
    sae = load_sae(root / "sae")
    with torch.no_grad():
        x_hat = sae(x)
    err = (x - x_hat).pow(2).sum(-1)
    assert out["mse"] == pytest.approx(float(err.mean()), rel=1e-4)
    assert out["fvu"] == pytest.approx(float(err.sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-4)

    probing = json.loads((run / "probing.json").read_text())
    assert probing["tasks"], probing["skipped"]
    for task in probing["tasks"].values():
        assert set(task["sae"]) == {"1", "5", "20"} and set(task["raw"]) == {"1", "5", "20"}
    assert "probe_f1_k5" in out and "probe_raw_f1_k5" in out
    page = (run / "features.html").read_text()
    assert page.count("class='f'") == 6 and "data:image/png;base64," in page  # 4 frequent + 2 random
    logged = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "loss_recovered" in logged and "fvu" in logged


def test_d_in_mismatch_is_one_line(setup):
    root, _, data = setup
    run = root / "bad"
    proc = run_train(f"sae_path={root / 'sae16'}", *data, "logger=none", f"hydra.run.dir={run}",
                     script="evaluate.py", check=False)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "d_in" in errors[0] and "16" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_synthetic_data_gives_reconstruction_metrics_only(tmp_path):
    save_sae(TopKSAE(d_in=64, d_sae=256, k=8), tmp_path / "sae")
    run_train(f"sae_path={tmp_path / 'sae'}", "data=synthetic", "eval.n_tokens=2048", "logger=none",
              f"hydra.run.dir={tmp_path / 'run'}", script="evaluate.py")
    out = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert out["n_tokens"] == 2048 and out["l0"] == pytest.approx(8.0)
    assert "mmcs" in out and "ce_clean" not in out
    assert "downstream_skipped" in out["info"]
