"""A rational export loaded by SAELens (`rsae.integrations.saelens`) gives rsae's codes and
reconstructions, in every gate, sharing, scale and denominator mode; rsae works without SAELens."""

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from rsae.io.saelens import load_sae, save_sae
from rsae.sae import RationalSAE

D_IN, D_SAE, SCALE = 12, 48, 0.37
GATES = ("none", "relu", "jumprelu", "topk")
SHARINGS = ("shared", "group", "latent")
DENOMINATORS = ("B", "A")
CASES = [(g, s, den, "latent") for g, s, den in itertools.product(GATES, SHARINGS, DENOMINATORS)]
CASES += [(g, "shared", "B", "scalar") for g in GATES]


@pytest.fixture(scope="module")
def sae_lens():
    lib = pytest.importorskip("sae_lens")
    import rsae.integrations.saelens  # noqa: F401  (registers "rational")
    return lib


def _rational(gate: str, sharing: str, denominator: str, scale_mode: str, seed: int = 0) -> RationalSAE:
    """A rational SAE with random weights, coefficients, scales and thresholds (non-unit decoder
    rows), whose pre-activations on `_inputs` reach past t_max and straddle the thresholds."""
    gen = torch.Generator().manual_seed(seed)
    degrees = (3, 2) if sharing == "group" else (5, 4)
    sae = RationalSAE(d_in=D_IN, d_sae=D_SAE, degrees=degrees, denominator=denominator, sharing=sharing, n_groups=5,
                      scale_mode=scale_mode, init_table=None, t_max=3.0, gate=gate, k=7 if gate == "topk" else None,
                      unit_norm_decoder=False)
    g = sae.rational_gate
    n_scales = g.log_c_in.numel()
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        g.a.copy_(torch.randn(g.a.shape, generator=gen))
        g.b.copy_(torch.randn(g.b.shape, generator=gen))
        g.set_scales(torch.rand(n_scales, generator=gen) + 0.3, torch.rand(n_scales, generator=gen) + 0.5)
        if gate == "jumprelu":
            sae.log_threshold.copy_((torch.rand(D_SAE, generator=gen) * 0.8 + 0.05).log())
    return sae.eval()


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(seed)) * 3 / SCALE  # raw activations


@pytest.mark.parametrize("gate,sharing,denominator,scale_mode", CASES)
def test_saelens_loads_rational_export_with_rsae_codes(tmp_path, sae_lens, gate, sharing, denominator, scale_mode):
    from rsae.integrations.saelens import RationalSAELens

    sae = _rational(gate, sharing, denominator, scale_mode)
    save_sae(sae, tmp_path, scale=SCALE)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert isinstance(theirs, RationalSAELens) and theirs.cfg.architecture() == "rational"
    assert (theirs.cfg.gate, theirs.cfg.sharing, theirs.cfg.denominator, theirs.cfg.scale_mode) == (gate, sharing, denominator, scale_mode)
    x = _inputs()
    with torch.no_grad():
        h = sae.pre_acts(x * SCALE)
        z_ref = sae.encode(x * SCALE)
        xhat_ref = sae.decode(z_ref) / SCALE
        z = theirs.encode(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z != 0, z_ref != 0)  # the same latents fire
        torch.testing.assert_close(theirs.decode(z), xhat_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(x), xhat_ref, rtol=1e-4, atol=1e-4)
    # The case is not degenerate: the mask is active, and t = h / C_in goes beyond the clamp.
    assert (z_ref == 0).any() == (gate != "none")
    assert (z_ref != 0).sum() > z_ref.shape[0]
    assert (h.abs() / sae.rational_gate.c_in > 3.0).any()


def test_saelens_hooks_error_term_and_weight_metrics_run_on_an_rsae(tmp_path, sae_lens):
    from sae_lens.evals import get_featurewise_weight_based_metrics

    sae = _rational("jumprelu", "group", "B", "latent")
    save_sae(sae, tmp_path, scale=SCALE)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = _inputs()
    with torch.no_grad():
        z_ref = sae.encode(x * SCALE)
        out, cache = theirs.run_with_cache(x)
        torch.testing.assert_close(cache["hook_sae_acts_post"], z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache["hook_sae_acts_pre"], sae.pre_acts(x * SCALE), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, sae.decode(z_ref) / SCALE, rtol=1e-4, atol=1e-4)
        theirs.use_error_term = True  # SAELens adds back the reconstruction error: output == input
        torch.testing.assert_close(theirs(x), x, rtol=1e-4, atol=1e-4)
    metrics = get_featurewise_weight_based_metrics(theirs)
    assert len(metrics["encoder_norm"]) == D_SAE
    torch.testing.assert_close(torch.tensor(metrics["encoder_bias"]), sae.b_enc.detach())


@pytest.mark.parametrize("gate", GATES)
def test_saelens_save_model_reloads_in_rsae(tmp_path, sae_lens, gate):
    sae = _rational(gate, "latent", "A", "latent")
    save_sae(sae, tmp_path / "rsae", scale=SCALE)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "rsae"))
    theirs.save_model(tmp_path / "saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "rational" and cfg["gate"] == gate and cfg["degrees"] == [5, 4]
    ours = load_sae(tmp_path / "saelens")
    again = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    x = _inputs()
    with torch.no_grad():
        z_ref = sae.encode(x * SCALE)
        torch.testing.assert_close(ours.encode(x), z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again.encode(x), z_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", ("none", "relu", "jumprelu"))
def test_fold_w_dec_norm_keeps_the_reconstruction(tmp_path, sae_lens, gate):
    sae = _rational(gate, "latent", "B", "latent")
    save_sae(sae, tmp_path, scale=SCALE)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), fold_W_dec_norm=True)
    norms = sae.W_dec.detach().norm(dim=1) / SCALE  # of the exported decoder rows
    assert (norms - 1).abs().min() > 0.1  # the fold has something to do
    torch.testing.assert_close(theirs.W_dec.norm(dim=1), torch.ones(D_SAE))
    x = _inputs()
    with torch.no_grad():
        z_ref = sae.encode(x * SCALE)
        torch.testing.assert_close(theirs.encode(x), z_ref * norms, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(x), sae.decode(z_ref) / SCALE, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate,scale_mode", [("topk", "latent"), ("relu", "scalar")])
def test_fold_w_dec_norm_refuses_what_it_cannot_keep(tmp_path, sae_lens, gate, scale_mode):
    save_sae(_rational(gate, "shared", "B", scale_mode), tmp_path, scale=SCALE)
    with pytest.raises(NotImplementedError, match=f"scale_mode={scale_mode}, gate={gate}"):
        sae_lens.SAE.load_from_disk(str(tmp_path), fold_W_dec_norm=True)


def test_bad_gate_in_cfg_is_one_line(tmp_path, sae_lens):
    save_sae(_rational("relu", "shared", "B", "latent"), tmp_path, scale=SCALE)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "gate": "sigmoid"}))
    with pytest.raises(ValueError, match=r"^rational SAE config: gate must be one of .*'sigmoid'$"):
        sae_lens.SAE.load_from_disk(str(tmp_path))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_rsae_works_without_saelens(tmp_path):
    code = f"""
import sys
sys.modules["sae_lens"] = None  # as if SAELens were not installed
import torch
import rsae, rsae.sae, rsae.io.saelens, rsae.rational
from rsae.sae import RationalSAE
sae = RationalSAE(d_in=4, d_sae=8, gate="relu").eval()
rsae.io.saelens.save_sae(sae, {str(tmp_path)!r})
x = torch.randn(3, 4)
assert torch.equal(rsae.io.saelens.load_sae({str(tmp_path)!r}).encode(x), sae.encode(x))
try:
    import rsae.integrations.saelens
except ImportError as exc:
    print("refused:", exc)
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert "refused: rsae.integrations.saelens needs SAELens 6.x: pip install 'sae-lens>=6,<7'" in res.stdout


def test_importing_rsae_does_not_import_saelens():
    res = _python("import sys, rsae, rsae.sae, rsae.io.saelens, rsae.rational, rsae.integrations; "
                  "print('sae_lens' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
