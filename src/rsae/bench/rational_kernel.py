"""Resource report of the fused rational kernels, compiled for a GPU target without needing a GPU.

    python -m rsae.bench rational_kernel                 # sm_90 (H100 / H200)
    python -m rsae.bench rational_kernel --arch 80 --degrees 5,4 9,8

Compiles the forward and backward kernel of `rsae.rational.kernel_triton` for every tile shape
(FWD_CONFIGS / BWD_CONFIGS) and a few degree / sharing combinations with Triton's own compiler,
then reads registers, stack and local (spill) memory per thread from the cubin with the
`cuobjdump` that ships with Triton. A tile shape whose kernel spills (LOCAL > 0) is slow: keep
the configurations spill-free. Runs on the CPU (no driver is touched).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rsae.bench rational_kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--degrees", nargs="+", default=["5,4", "9,8", "3,2"], help="p,q pairs")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    return p.parse_args(argv)


def _signature(kernel, dtype: str, consts: dict) -> tuple[dict, dict]:
    tensors = {"h_ptr", "y_ptr", "g_ptr", "dh_ptr"}
    ints = {"n_rows", "n_cols", "stride_a", "stride_b", "ROWS_PER_PROG"}
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in tensors:
            sig[name] = f"*{dtype}"
        elif name == "set_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ints:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig, {(kernel.arg_names.index(k),): v for k, v in consts.items()}


def resources(kernel, dtype: str, consts: dict, num_warps: int, arch: int, workdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs = _signature(kernel, dtype, consts)
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as handle:
        handle.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from rsae.rational import kernel_triton as K

    if K.triton is None:
        print("triton is not importable", file=sys.stderr)
        return 1
    fwd, bwd = K.jit_kernels()
    cases = []
    for pq in args.degrees:
        p, q = (int(x) for x in pq.split(","))
        cases += [(p, q, False, 0, True), (p, q, True, 2, True), (p, q, False, 1, False)]
    print(f"| kernel | tile (rows x latents, warps) | degrees | denominator | coefficients | scales | registers | stack | local (spills) |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0
    with tempfile.TemporaryDirectory() as workdir:
        for p, q, den_a, mode, per_col in cases:
            base = dict(P_DEG=p, Q_DEG=q, DEN_A=den_a, COEF_MODE=mode, SCALE_PER_COL=per_col, POSITIVE_ONLY=per_col)
            # With per-latent scales the L1 term's column sums of |y| are on (forward and backward),
            # as in a ReLU-mask RSAE's training step; the other cases leave them off.
            jobs = [("forward", fwd, {**base, "ABS_SUM": per_col}, cfg) for cfg in K.FWD_CONFIGS]
            bwd_consts = {**base, "NEED_DH": True, "NEED_PARAMS": True, "ABS_GRAD": per_col, "N_PAR": p + q + 3}
            jobs += [("backward", bwd, bwd_consts, cfg) for cfg in K.BWD_CONFIGS]
            for name, kernel, consts, (m, n, w) in jobs:
                res = resources(kernel, args.dtype, {**consts, "BLOCK_M": m, "BLOCK_N": n}, w, args.arch, workdir)
                worst = max(worst, res.get("LOCAL", 0))
                print(f"| {name} | {m} x {n}, {w} | ({p}, {q}) | {'A' if den_a else 'B'} | "
                      f"{['shared', 'latent', 'group'][mode]} | {'latent' if per_col else 'scalar'} | {res.get('REG')} | "
                      f"{res.get('STACK')} | {res.get('LOCAL')} |", flush=True)
    print(f"\nsm_{args.arch}: {'no spills' if worst == 0 else f'SPILLS (up to {worst} bytes of local memory per thread)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
