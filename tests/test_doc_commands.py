"""Every `python train.py ...` command in README.md, BENCHMARKS.md and docs/ composes and passes the
config checks (placeholders such as `<SAE dir>` are skipped), so the docs cannot keep a layout the
code no longer reads."""

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir

import rsae.config  # noqa: F401  (registers the config resolvers)
from conftest import ROOT
from rsae.validate import check_config
from rsae.validate_upgrade import check_overrides

DOCS = ("README.md", "BENCHMARKS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))


def commands(doc: str) -> list[list[str]]:
    text = (ROOT / doc).read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python train.py") and "<" not in line:
                out.append(shlex.split(line)[2:])
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_documented_train_commands_compose_and_pass_the_checks(doc):
    found = commands(doc)
    assert any("teacher.path=" in " ".join(args) for args in found) or doc != "README.md"  # the upgrade is there
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for args in found:
            if "-m" in args or any(a.startswith("--") for a in args):
                continue
            args = [a for a in args if not a.startswith("hydra.")]
            check_overrides(args)
            check_config(compose("train", overrides=args))
