"""RationalSAE: gates/masks, losses, export round trip, upgrade from teachers and calibration."""

import json

import pytest
import torch

from rsae.io.saelens import load_sae, save_sae
from rsae.sae import ARCHITECTURES, BatchTopKSAE, ConfigError, GatedSAE, JumpReLUSAE, RationalSAE, ReLUSAE, TopKSAE
from rsae.rational import load_table
from rsae.sae.matryoshka import MatryoshkaSAE
from rsae.sae.rational_upgrade import teacher_table

D_IN, D_SAE = 16, 64


def _randomised(sae, seed=0):
    """Perturb every parameter a little, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.b_dec.normal_(0, 0.3, generator=g)
        rg = sae.rational_gate
        rg.a.add_(torch.randn(rg.a.shape, generator=g) * 0.01)
        rg.b.add_(torch.randn(rg.b.shape, generator=g) * 0.01)
        rg.log_c_in.add_(torch.randn(rg.log_c_in.shape, generator=g) * 0.2)
        rg.log_c_out.add_(torch.randn(rg.log_c_out.shape, generator=g) * 0.2)
        if sae.gate == "jumprelu":
            sae.log_threshold.add_(torch.randn(sae.log_threshold.shape, generator=g) * 0.2)
    return sae


def _make(gate="relu", **kw):
    if gate == "topk":
        kw.setdefault("k", 6)
    if gate in ("jumprelu", "topk", "none"):
        kw.setdefault("init_table", "jumprelu_9_8_t0.3")
    return RationalSAE(D_IN, D_SAE, gate=gate, c_in_init=2.0, **kw)


def test_registered_and_configurable():
    assert ARCHITECTURES["rational"] is RationalSAE
    sae = RationalSAE(D_IN, expansion_factor=4)
    assert sae.d_sae == 64 and sae.gate == "relu" and sae.rational_gate.degrees == (5, 4)
    with pytest.raises(ConfigError, match="from_teacher"):
        RationalSAE(D_IN, D_SAE, gate="teacher")
    with pytest.raises(ConfigError, match="k"):
        RationalSAE(D_IN, D_SAE, gate="topk")
    with pytest.raises(ConfigError, match="degrees"):
        RationalSAE(D_IN, D_SAE, degrees=(3, 2), init_table="relu_5_4")
    with pytest.raises(ConfigError, match="init_table"):
        RationalSAE(D_IN, D_SAE, init_table="nope")
    with pytest.raises(ConfigError, match="gate"):
        RationalSAE(D_IN, D_SAE, gate="gelu")


def test_masks():
    torch.manual_seed(0)
    x = torch.randn(32, D_IN) * 3
    sae = _make("relu")
    h = sae.pre_acts(x)
    z = sae.encode(x)
    assert torch.equal(z != 0, h > 0)
    sae = _make("jumprelu", init_threshold=0.5)
    h, z = sae.pre_acts(x), sae.encode(x)
    assert torch.equal(z != 0, h > 0.5)
    sae = _make("topk", k=5)
    h, z = sae.pre_acts(x), sae.encode(x)
    assert ((z != 0).sum(-1) <= 5).all()
    assert torch.equal(z != 0, TopKSAE.activation(sae, h) != 0)  # same selection as TopK
    sae = _make("none")
    assert (sae.encode(x) != 0).float().mean() > 0.99  # the pure rational gate is dense


@pytest.mark.parametrize("gate", ["none", "relu", "jumprelu", "topk"])
def test_training_losses_and_gradients(gate):
    torch.manual_seed(1)
    sae = _make(gate, l1_coefficient=1.0, l0_coefficient=0.1, dead_after_tokens=16)
    sae.train()
    x = torch.randn(64, D_IN) * 3
    sae.training_output(x)  # after one batch some latents count as dead (for AuxK)
    out = sae.training_output(x, step=10)
    expected = {"mse", "l1"} | ({"l0"} if gate == "jumprelu" else set()) | ({"aux"} if gate == "topk" else set())
    assert set(out.losses) == expected
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("a", "b", "log_c_in", "log_c_out"):
        assert getattr(sae.rational_gate, name).grad.abs().sum() > 0, name
    if gate == "jumprelu":
        assert sae.log_threshold.grad.abs().sum() > 0  # thresholds move (straight-through)


def test_l1_warmup_and_weighting():
    sae = _make("relu", l1_coefficient=2.0, l1_warmup_steps=10)
    x = torch.randn(8, D_IN)
    out0, out9 = sae.training_output(x, step=0), sae.training_output(x, step=9)
    l1 = (out0.z.abs() * sae.decoder_norms()).sum(-1).mean()
    torch.testing.assert_close(out0.losses["l1"], 2.0 * 0.1 * l1)
    torch.testing.assert_close(out9.losses["l1"], 2.0 * l1)


def test_l0_at_tolerances():
    torch.manual_seed(2)
    sae = _make("none")
    z = sae.encode(torch.randn(100, D_IN) * 3).detach()
    counts = sae.l0_at_tolerances(z, [0.0, 1e-3, 1e-2, 1e-1, 1.0])
    values = list(counts.values())
    assert values == sorted(values, reverse=True) and values[0] <= D_SAE and values[-1] < values[0]
    ref = sae.mean_contribution(z)
    assert sae.l0_at_tolerances(z, [0.1], reference=ref) == {0.1: counts[0.1]}
    absolute = sae.l0_at_tolerances(z, [0.05], relative=False)[0.05]
    assert absolute == pytest.approx(float((z.abs() > 0.05).float().sum(-1).mean()))


def test_bf16_autocast_forward_is_finite():
    sae = _make("jumprelu")
    x = torch.randn(16, D_IN) * 1e3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_output(x)
    assert torch.isfinite(out.loss) and torch.isfinite(out.z.float()).all()


EXPORT_CASES = [
    dict(gate="relu"),
    dict(gate="none", sharing="group", n_groups=4, scale_mode="scalar"),
    dict(gate="jumprelu", sharing="latent"),
    dict(gate="topk", k=7, denominator="A", degrees=(3, 2), init_table=None),
]


@pytest.mark.parametrize("kw", EXPORT_CASES, ids=lambda kw: kw["gate"])
def test_export_round_trip_is_exact(tmp_path, kw):
    sae = _randomised(_make(**kw)).eval()
    save_sae(sae, tmp_path, scale=1.0)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "rational" and cfg["gate"] == kw["gate"]
    loaded = load_sae(tmp_path)
    assert type(loaded) is RationalSAE and loaded.gate == sae.gate
    assert loaded.rational_gate.degrees == sae.rational_gate.degrees
    assert loaded.rational_gate.denominator == sae.rational_gate.denominator
    for name, p in sae.state_dict().items():
        if name != "tokens_since_fired" and "log_" not in name:
            assert torch.equal(loaded.state_dict()[name], p), name
    # positive parameters are stored by their logs; the values they stand for are identical
    assert torch.equal(loaded.rational_gate.c_in, sae.rational_gate.c_in)
    assert torch.equal(loaded.rational_gate.c_out, sae.rational_gate.c_out)
    if sae.gate == "jumprelu":
        assert torch.equal(loaded.threshold, sae.threshold)
    x = torch.randn(50, D_IN) * 3
    with torch.no_grad():
        z = sae.encode(x)
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), sae.decode(z))


def test_export_with_activation_scale_works_on_raw_inputs(tmp_path):
    scale = 0.37
    sae = _randomised(_make("jumprelu")).eval()
    save_sae(sae, tmp_path, scale=scale)
    loaded = load_sae(tmp_path)
    x = torch.randn(50, D_IN) * 3 / scale  # raw activations
    with torch.no_grad():
        z = sae.encode(x * scale)
        torch.testing.assert_close(loaded.encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), sae(x * scale) / scale, rtol=1e-4, atol=1e-4)
    # gate parameters live in h space: not rescaled
    assert torch.equal(loaded.rational_gate.c_in, sae.rational_gate.c_in)


# --- upgrading teachers -------------------------------------------------------------------------
def _teacher(kind):
    torch.manual_seed(3)
    if kind == "relu":
        t = ReLUSAE(D_IN, D_SAE)
    elif kind == "jumprelu":
        t = JumpReLUSAE(D_IN, D_SAE)
        with torch.no_grad():
            t.log_threshold.copy_(torch.empty(D_SAE).uniform_(0.3, 1.0).log())
    elif kind == "topk":
        t = TopKSAE(D_IN, D_SAE, k=6)
    elif kind == "batchtopk":
        t = BatchTopKSAE(D_IN, D_SAE, k=6)
        t.inference_threshold.fill_(0.8)
        t.threshold_initialised.fill_(True)
    if kind == "gated":
        t = GatedSAE(D_IN, D_SAE)
        with torch.no_grad():  # thresholds b_mag - exp(r_mag) b_gate mostly above 0
            t.b_gate.uniform_(-1.0, 0.2), t.r_mag.normal_(0, 0.3), t.b_mag.normal_(0, 0.3)
    with torch.no_grad():
        if kind != "gated":
            t.b_enc.normal_(0, 0.3)
        t.b_dec.normal_(0, 0.1)
    return t.eval()


def _synthetic_acts(n=512, seed=4):
    """Sparse superposition data (a few active features per token), E||x|| ~ sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(128, D_IN, generator=g), dim=-1)
    active = torch.rand(n, 128, generator=g) < 6 / 128
    mags = 0.5 + torch.rand(n, 128, generator=g)
    return (active * mags) @ feats * 1.5


@pytest.mark.parametrize("kind,mechanism", [("relu", "relu"), ("jumprelu", "jumprelu"), ("topk", "topk"), ("batchtopk", "jumprelu"),
                                            ("gated", "jumprelu")])
def test_from_teacher_copies_weights_and_mechanism(kind, mechanism):
    teacher = _teacher(kind)
    sae = RationalSAE.from_teacher(teacher)
    assert sae.gate == mechanism
    for name, t in teacher.skeleton_weights().items():  # the Gated SAE's: its magnitude path
        assert torch.equal(getattr(sae, name), t)
    if kind == "gated":
        torch.testing.assert_close(sae.threshold, teacher.upgrade_threshold().clamp_min(1e-12))
    if kind == "jumprelu":
        assert torch.equal(sae.threshold, teacher.threshold)
        t0 = sae.rational_gate.cutoff
        torch.testing.assert_close(sae.rational_gate.c_in, teacher.threshold / t0)  # C_in_j = theta_j / t0
    if kind == "batchtopk":
        assert torch.equal(sae.threshold, teacher.inference_threshold.expand(D_SAE))
    if kind == "topk":
        assert sae.k == teacher.k
    assert sae.rational_gate.degrees == ((5, 4) if kind == "relu" else (9, 8))
    assert RationalSAE.from_teacher(teacher, gate="none").gate == "none"
    assert RationalSAE.from_teacher(teacher, degrees=(9, 8) if kind != "relu" else (3, 2)).rational_gate.degrees[0] in (3, 9)


def test_teacher_table_follows_degrees_and_denominator():
    assert teacher_table("relu", None) == "relu_5_4" and teacher_table("relu", None, "A") == "relu_5_4_A"
    assert teacher_table("relu", (3, 2)) == "relu_3_2" and teacher_table("relu", (3, 2), "A") == "relu_3_2_A"
    assert teacher_table("jumprelu", None, "A") == "jumprelu_9_8_t0.3_A"
    assert teacher_table("topk", (9, 8), "A") == "topk_9_8_A"
    with pytest.raises(ConfigError, match=r"degrees \(7, 6\) and denominator B"):
        teacher_table("relu", (7, 6))
    sae = RationalSAE.from_teacher(_teacher("jumprelu"), denominator="A")
    assert sae.rational_gate.denominator == "A" and sae.rational_gate.degrees == (9, 8)
    with pytest.raises(ConfigError, match="its version-A twin is 'relu_5_4_A'"):  # from scratch: the config's B table
        RationalSAE(D_IN, D_SAE, denominator="A", init_table="relu_5_4")


@pytest.mark.parametrize("mechanism,prefix,cutoff", [("relu", "relu", 0.0), ("jumprelu", "jumprelu", 0.3), ("topk", "topk", 0.2)])
@pytest.mark.parametrize("degrees", [(3, 2), (5, 4), (9, 8)])
@pytest.mark.parametrize("denominator", ["B", "A"])
def test_teacher_table_for_every_degrees_ablation(mechanism, prefix, cutoff, degrees, denominator):
    """(3,2) / (5,4) / (9,8) exist for every teacher; jump tables at the default's cut-off."""
    name = teacher_table(mechanism, degrees, denominator)
    p, q = degrees
    suffix = ("_t0.3" if mechanism == "jumprelu" else "") + ("_A" if denominator == "A" else "")
    assert name == f"{prefix}_{p}_{q}{suffix}"
    table = load_table(name)
    assert (table["gate"], table["degrees"], table["denominator"], table["cutoff"]) == (mechanism, degrees, denominator, cutoff)


@pytest.mark.parametrize("kind,table", [("relu", "relu_5_4"), ("jumprelu", "jumprelu_5_4_t0.3"), ("topk", "topk_5_4"),
                                        ("batchtopk", "jumprelu_5_4_t0.3"), ("matryoshka", "jumprelu_5_4_t0.3")])
@pytest.mark.parametrize("denominator", ["B", "A"])
def test_from_teacher_picks_the_degrees_table(kind, table, denominator):
    """sae.degrees=[5,4]: BatchTopK / Matryoshka teachers are upgraded through their inference
    threshold (jumprelu mask, C_in = theta / t0), so they take the jumprelu table, as by default."""
    if kind == "matryoshka":
        teacher = MatryoshkaSAE(D_IN, D_SAE, k=6).eval()
        teacher.inference_threshold.fill_(0.8)
        teacher.threshold_initialised.fill_(True)
    else:
        teacher = _teacher(kind)
    name = table + ("_A" if denominator == "A" else "")
    sae = RationalSAE.from_teacher(teacher, degrees=(5, 4), denominator=denominator)
    assert sae.rational_gate.init_table == name and sae.rational_gate.degrees == (5, 4)
    assert sae.rational_gate.denominator == denominator and sae.rational_gate.cutoff == load_table(name)["cutoff"]
    torch.testing.assert_close(sae.rational_gate.a[0], torch.tensor(load_table(name)["a"], dtype=torch.float32))


def test_teacher_table_prefers_the_default_cutoff(monkeypatch):
    """With several cut-offs at the asked degrees, the default's (t0 = 0.3) wins over sort order."""
    import rsae.sae.rational_upgrade as ru

    real_names, real_load = ru.available_tables(), ru.load_table
    fake = {"jumprelu_5_4_t0.1": {**real_load("jumprelu_5_4_t0.3"), "name": "jumprelu_5_4_t0.1", "cutoff": 0.1}}
    monkeypatch.setattr(ru, "available_tables", lambda: sorted(real_names + list(fake)))
    monkeypatch.setattr(ru, "load_table", lambda n: dict(fake[n]) if n in fake else real_load(n))
    assert teacher_table("jumprelu", (5, 4)) == "jumprelu_5_4_t0.3"
    monkeypatch.setattr(ru, "available_tables", lambda: sorted([n for n in real_names if n != "jumprelu_5_4_t0.3"] + list(fake)))
    assert teacher_table("jumprelu", (5, 4)) == "jumprelu_5_4_t0.1"  # another cut-off when the default's is missing


@pytest.mark.parametrize("kind,denominator", [("relu", "B"), ("jumprelu", "B"), ("topk", "B"), ("batchtopk", "B"),
                                              ("gated", "B"), ("relu", "A"), ("topk", "A")])
def test_calibrated_init_reproduces_teacher(kind, denominator):
    teacher = _teacher(kind)
    x = _synthetic_acts()
    with torch.no_grad():
        h = teacher.pre_acts(x)
        z_t = teacher.activation(h)
    assert (z_t != 0).any()
    sae = RationalSAE.from_teacher(teacher, gate="teacher", denominator=denominator)
    stats = sae.calibrate(h, z_t, steps=50)
    tol = 0.02 if denominator == "B" else 0.03  # the version-A TopK table fits 1.4x worse outside the jump
    with torch.no_grad():
        h_s = sae.pre_acts(x)
        assert torch.equal(h_s, h)
        z = sae.activation(h_s)
        rel = float((z - z_t).norm() / z_t.norm())
        assert rel < tol and stats["rel_l2_after"] < tol
        assert torch.equal(z != 0, z_t != 0)  # exactly the teacher's non-zero pattern
        # and the reconstruction matches the teacher's (MSE ratio ~ 1)
        mse_t = (teacher.decode(z_t) - x).pow(2).sum(-1).mean()
        mse_s = (sae.decode(z) - x).pow(2).sum(-1).mean()
        assert abs(float(mse_s / mse_t) - 1) < 0.01
        # held-out tokens of the same distribution
        x2 = _synthetic_acts(seed=5)
        z2_t, z2 = teacher.encode(x2), sae.encode(x2)
        assert torch.equal(z2 != 0, z2_t != 0) and float((z2 - z2_t).norm() / z2_t.norm()) < tol


def test_calibration_improves_the_pure_rational_gate():
    teacher = _teacher("relu")
    x = _synthetic_acts()
    with torch.no_grad():
        h = teacher.pre_acts(x)
        z_t = teacher.activation(h)
    sae = RationalSAE.from_teacher(teacher, gate="none")
    stats = sae.calibrate(h[:256], z_t[:256], steps=15)
    h, z_t = h[:256], z_t[:256]
    assert stats["rel_l2_after"] < stats["rel_l2_before"] and stats["rel_l2_after"] < 0.05
    assert stats["rel_l2_after"] == pytest.approx(sae.codes_error(h, z_t), rel=1e-3)
    # frozen weights untouched
    assert torch.equal(sae.W_enc, teacher.W_enc) and sae.W_enc.requires_grad


def test_few_training_steps_reduce_the_loss():
    torch.manual_seed(6)
    sae = RationalSAE(D_IN, D_SAE, gate="relu", c_in_init=4.0, l1_coefficient=0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    x = _synthetic_acts(128)
    losses = []
    for step in range(30):
        out = sae.training_output(x, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("sharing,scale_mode", [("latent", "latent"), ("group", "scalar")])
def test_calibration_with_coefficient_sets(sharing, scale_mode):
    teacher = _teacher("relu")
    x = _synthetic_acts()
    with torch.no_grad():
        h = teacher.pre_acts(x)
        z_t = teacher.activation(h)
    sae = RationalSAE.from_teacher(teacher, degrees=(3, 2), sharing=sharing, n_groups=4, scale_mode=scale_mode)
    stats = sae.calibrate(h, z_t, steps=20)
    assert stats["rel_l2_before"] > 0.01 and stats["rel_l2_after"] < 1e-3
    assert stats["fraction_clamped"] == 0.0


def test_calibrate_rejects_mismatched_shapes():
    sae = RationalSAE.from_teacher(_teacher("relu"))
    with pytest.raises(ConfigError):
        sae.calibrate(torch.randn(8, D_SAE), torch.randn(8, D_SAE - 1))


def test_train_metrics_report_the_gate_shape():
    sae = RationalSAE(D_IN, D_SAE, sharing="group", n_groups=4)  # relu_5_4, C_in = C_out = 4
    m = {k: float(v) for k, v in sae.train_metrics().items()}
    assert m["gate_r0"] == pytest.approx(0.00425, abs=1e-5) and m["gate_r1"] == pytest.approx(0.99575, abs=1e-4)
    assert m["gate_gain"] == pytest.approx(1.0)
    with torch.no_grad():
        sae.rational_gate.a[:, 0] += 0.1  # r(0) = a_0: the jump a ReLU mask then makes at h = 0
        sae.rational_gate.log_c_out.add_(0.5)
    m2 = {k: float(v) for k, v in sae.train_metrics().items()}
    assert m2["gate_r0"] == pytest.approx(m["gate_r0"] + 0.1, abs=1e-6) and m2["gate_r_tmax"] > m["gate_r_tmax"]
    assert m2["gate_gain"] == pytest.approx(float(torch.tensor(0.5).exp()), rel=1e-5)
