"""NCCL all-reduce bandwidth between the GPUs of one host (`torchrun --nproc_per_node=N -m rsae.bench.allreduce`):
the link a DDP step's gradient all-reduce crosses, in the sizes an SAE's gradient has."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    for dtype, mib in ((torch.float32, 64), (torch.float32, 1152), (torch.bfloat16, 576)):
        x = torch.ones(mib * 2**20 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        n = 10
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / n
        # bus bandwidth as nccl-tests defines it for all-reduce: size * 2 (n - 1) / n / time
        bus = mib * 2**20 * 2 * (world - 1) / world / s / 1e9
        if rank == 0:
            print(f"all_reduce {str(dtype).removeprefix('torch.')} {mib} MiB x {world} GPUs: {s * 1e3:.2f} ms, bus {bus:.0f} GB/s",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
