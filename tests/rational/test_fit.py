"""Minimax / least-squares fits against known values, and the shipped coefficient tables."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from rsae.rational import RationalGate, available_tables, load_table, rational  # noqa: E402
from rsae.rational.fit import BOUND, TABLE_SPECS, check_table, fit_gate, gate_target, grid, main  # noqa: E402

# Boulle, Nakatsukasa & Townsend 2020, "Rational neural networks": best (3,2) fit of ReLU on [-1, 1].
BOULLE_3_2 = {"a": [0.0218, 0.5, 1.5957, 1.1915], "b": [0.0, 2.383], "max_error": 0.0218}


def test_relu_3_2_minimax_matches_literature():
    res = fit_gate("relu", (3, 2))
    assert abs(res.max_error - 0.02184) < 2e-5
    np.testing.assert_allclose(res.a, BOULLE_3_2["a"], atol=1e-3)
    np.testing.assert_allclose(res.b, BOULLE_3_2["b"], atol=1e-3)
    # equioscillation: the error reaches its max (to 1e-6) at p + q + 2 = 7 or more places
    t = grid()
    err = np.asarray(rational(torch.tensor(t), torch.tensor(res.a), torch.tensor(res.b))) - gate_target("relu", t)
    peaks = np.flatnonzero(np.abs(np.abs(err) - res.max_error) < 1e-6)
    assert len(np.unique(np.round(t[peaks], 2))) >= 7


def test_relu_5_4_minimax_matches_known_value():
    res = fit_gate("relu", (5, 4))
    assert abs(res.max_error - 0.00425) < 2e-5  # docs/design.md: about 0.0043


def test_least_squares_trades_max_error_for_mse():
    mm = fit_gate("relu", (3, 2), method="minimax")
    ls = fit_gate("relu", (3, 2), method="lsq")
    assert ls.mse < 0.7 * mm.mse and ls.max_error > mm.max_error


def test_version_a_denominator_fit():
    res = fit_gate("relu", (3, 2), denominator="A")
    assert all(b >= 0 for b in res.b)
    # version A's denominator is even in t, which suits ReLU = (t + |t|) / 2 as well as B here
    assert res.max_error < 0.03


def test_topk_target_is_the_gate_at_its_cutoff():
    t = grid()
    np.testing.assert_array_equal(gate_target("topk", t, 0.2), np.where(t > 0.2, t, 0.0))
    np.testing.assert_array_equal(gate_target("topk", t, 0.2), gate_target("jumprelu", t, 0.2))


def test_jump_fit_is_bounded_and_accurate_away_from_the_jump():
    t0 = 0.3
    res = fit_gate("jumprelu", (9, 8), cutoff=t0)
    coefs = np.abs(np.r_[res.a, res.b])
    assert coefs.max() <= BOUND * (1 + 1e-9)
    assert res.max_error >= 0.45 * t0  # no continuous r beats half the jump height (grid: ~)
    assert res.max_error_outside_window < 0.02
    # float32 evaluation (as the gate runs) agrees with float64: bounded coefficients do not explode
    t = torch.tensor(grid())
    y64 = rational(t, torch.tensor(res.a), torch.tensor(res.b))
    y32 = rational(t.float(), torch.tensor(res.a).float(), torch.tensor(res.b).float())
    assert (y32.double() - y64).abs().max() < 1e-4


def test_plain_minimax_of_a_jump_is_worse_in_mse():
    windowed = fit_gate("jumprelu", (9, 8), cutoff=0.3)
    plain = fit_gate("jumprelu", (9, 8), cutoff=0.3, window=0.0)
    assert plain.max_error < windowed.max_error  # the plain criterion wins only on its own terms
    assert windowed.mse < 0.1 * plain.mse


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError):
        fit_gate("gelu", (3, 2))
    with pytest.raises(ValueError):
        fit_gate("jumprelu", (9, 8))  # needs a cut-off


# The degrees ablation (3,2) / (5,4) / (9,8) on every teacher: jumps at the upgrade defaults' cut-offs.
ABLATION_TABLES = {
    "relu": ["relu_3_2", "relu_5_4", "relu_9_8"],
    "jumprelu": ["jumprelu_3_2_t0.3", "jumprelu_5_4_t0.3", "jumprelu_9_8_t0.3"],
    "topk": ["topk_3_2", "topk_5_4", "topk_9_8"],
}


def test_every_spec_has_a_shipped_table():
    assert set(TABLE_SPECS) == set(available_tables())  # no table without a spec to regenerate it
    assert len(TABLE_SPECS) == 24
    for names in ABLATION_TABLES.values():
        for name in names:
            assert name in available_tables() and f"{name}_A" in available_tables()


@pytest.mark.parametrize("gate", sorted(ABLATION_TABLES))
@pytest.mark.parametrize("suffix", ["", "_A"])
def test_ablation_tables_load_and_improve_with_degree(gate, suffix):
    tables = [load_table(name + suffix) for name in ABLATION_TABLES[gate]]
    cutoff = {"relu": 0.0, "jumprelu": 0.3, "topk": 0.2}[gate]
    for table, degrees in zip(tables, [(3, 2), (5, 4), (9, 8)]):
        assert (table["gate"], table["degrees"], table["cutoff"]) == (gate, degrees, cutoff)
        assert table["denominator"] == ("A" if suffix else "B") and table["method"] == "minimax"
        assert all(math.isfinite(c) for c in table["a"] + table["b"])
        if gate == "relu":
            assert table["max_error"] < 0.025
        else:  # a jump of height cutoff: max error >= cutoff / 2 (grid: ~), small away from it
            assert 0.45 * cutoff <= table["max_error"] < 0.65 * cutoff and table["max_error_outside_window"] < 0.1
    key = "max_error" if gate == "relu" else "max_error_outside_window"
    assert tables[0][key] > tables[1][key] > tables[2][key]
    assert tables[0]["mse"] > tables[1]["mse"] > tables[2]["mse"]


@pytest.mark.parametrize("name", available_tables())
def test_table_errors_match_recomputation(name):
    table = load_table(name)
    assert table["name"] == name and table["command"].startswith("python -m rsae.rational.fit")
    got = check_table(table)
    for key, value in got.items():
        assert math.isclose(value, table[key], rel_tol=1e-6, abs_tol=1e-12), (key, value, table[key])
    # the gate (float32) reproduces the recorded error
    p, q = table["degrees"]
    gate = RationalGate(1, init_table=name, denominator=table["denominator"])
    t = torch.tensor(grid(table["n_points"]), dtype=torch.float32)[:, None]
    err = (gate(t).detach()[:, 0].double() - torch.tensor(gate_target(table["gate"], grid(table["n_points"]), table["cutoff"]))).abs()
    assert abs(float(err.max()) - table["max_error"]) < 1e-4
    if table.get("max_error_outside_window") is not None:
        outside = np.abs(grid(table["n_points"]) - table["cutoff"]) >= table["window"]
        assert abs(float(err[torch.from_numpy(outside)].max()) - table["max_error_outside_window"]) < 1e-4
    assert max(abs(c) for c in table["a"] + table["b"]) <= table["bound"] * (1 + 1e-9)


def test_table_relu_errors_are_the_known_values():
    assert abs(load_table("relu_3_2")["max_error"] - 0.0218) < 1e-4
    assert abs(load_table("relu_5_4")["max_error"] - 0.0043) < 1e-4


def test_check_command(capsys):
    assert main(["--check"]) == 0
    assert "relu_5_4" in capsys.readouterr().out
