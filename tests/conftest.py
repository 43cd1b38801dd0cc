import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# De-quantised GGUF copies (rsae.data.gguf_cache) shared by this session's tests and subprocesses,
# kept out of the working tree.
if "RSAE_LM_CACHE" not in os.environ:
    os.environ["RSAE_LM_CACHE"] = tempfile.mkdtemp(prefix="rsae-lm-")
    atexit.register(shutil.rmtree, os.environ["RSAE_LM_CACHE"], True)
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


def run_interpreted(test_file: str, timeout: int = 300, **env: str) -> tuple[int, dict]:
    """(seed, results): a kernel test file run as a script in a subprocess under Triton's CPU
    interpreter (TRITON_INTERPRET must be set before triton is first imported), on a fresh seed; the
    script prints its results as one JSON line."""
    pytest.importorskip("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore", **env}
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), str(seed)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"interpreter run failed (seed {seed}):\n{proc.stderr[-3000:]}")
    return seed, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def triton_interpreter():
    return run_interpreted
