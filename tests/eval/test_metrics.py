import pytest
import torch

from rsae.eval.metrics import ReconstructionMetrics, feature_recovery


def test_metrics_match_hand_computation_over_batches():
    torch.manual_seed(0)
    x = torch.randn(50, 6) + 3.0  # offset: variance about zero would differ a lot from about the mean
    x_hat = x + 0.3 * torch.randn(50, 6)
    z = torch.relu(torch.randn(50, 10))
    z[:, 7] = 0  # never fires
    z[:, 8] = 0
    z[:3, 8] = 1.0  # fires on 6% of tokens: alive, not dense
    m = ReconstructionMetrics(d_in=6, d_sae=10, l0_tolerances=(0.5,))
    for i in range(0, 50, 16):  # uneven batches
        m.update(x[i : i + 16], x_hat[i : i + 16], z[i : i + 16])
    out = {k: float(v) for k, v in m.compute().items()}
    err = ((x - x_hat) ** 2).sum(-1)
    assert out["mse"] == pytest.approx(float(err.mean()), rel=1e-5)
    assert out["mse_per_dim"] == pytest.approx(float(err.mean() / 6), rel=1e-5)
    fvu = float(err.sum() / ((x - x.mean(0)) ** 2).sum())
    assert out["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert out["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5)
    fvu_about_zero = float(err.sum() / (x**2).sum())
    assert abs(out["fvu"] - fvu_about_zero) > 0.01  # the test would catch the variance-about-zero bug
    assert out["l0"] == pytest.approx(float((z != 0).sum(-1).float().mean()))
    fires = (z != 0).float().mean(0)
    assert out["alive"] == pytest.approx(float((fires > 0).float().mean()))
    assert out["dense"] == pytest.approx(float((fires > 0.1).float().mean()))
    assert out["alive"] == pytest.approx(0.9)
    assert out["l2_ratio"] == pytest.approx(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-5)
    assert out["l0_tol_0.5"] == pytest.approx(float((z > 0.5).sum(-1).float().mean()))


def test_perfect_reconstruction():
    x = torch.randn(20, 4)
    m = ReconstructionMetrics(4, 3)
    m.update(x, x.clone(), torch.ones(20, 3))
    out = m.compute()
    assert float(out["mse"]) == 0 and float(out["fvu"]) == 0 and float(out["l2_ratio"]) == pytest.approx(1.0)


def test_feature_recovery():
    true = torch.eye(4)
    dec = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 1.0]])
    out = feature_recovery(true, dec)
    c = 2**-0.5
    assert out["mmcs"] == pytest.approx((1 + 1 + c + c) / 4)
    assert out["recovered"] == pytest.approx(0.5)
