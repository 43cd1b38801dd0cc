"""`python -m rsae.bench rational_kernel` compiles the fused kernels for a GPU target without a GPU
and reads their registers; it must pass every compile-time switch the kernels declare."""

import pytest

from rsae.bench.rational_kernel import main


def test_resource_report_compiles_every_kernel_variant(capsys):
    triton = pytest.importorskip("triton")
    import os

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this triton has no CUDA tools")
    assert main(["--degrees", "3,2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| forward") or line.startswith("| backward")]
    assert len(rows) == 3 * 2 * 7  # three sharing/scale cases x (forward, backward) x seven tile shapes
    assert all(int(row.split("|")[7]) > 0 for row in rows)  # registers read from each compiled kernel
