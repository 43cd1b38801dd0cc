import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def run_train(*overrides: str, script: str = "train.py", check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry point in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def train_cli():
    return run_train
