"""Which collectives Gloo and NCCL carry for CUDA tensors here: two processes on GPU 0 over Gloo (the
layout of workers sharing a GPU), one process over NCCL (NCCL needs a GPU per process). Prints a line
per backend and collective, OK or the error.

    python benchmarks/cuda_collectives.py
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disttrain.comm.bucket import all_gather_flat
from disttrain.launcher.local import free_port


def _collectives(world: int) -> dict[str, object]:
    """Each collective the exchange uses, on a small CUDA tensor."""
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    return {
        "all_reduce": lambda: dist.all_reduce(x.clone()),
        "broadcast": lambda: dist.broadcast(x.clone(), src=0),
        "all_gather_into_tensor": lambda: all_gather_flat(torch.empty(world * 8, device="cuda"), x),
        "all_gather (list)": lambda: dist.all_gather([torch.empty_like(x) for _ in range(world)], x),
        "all_to_all_single": lambda: dist.all_to_all_single(torch.empty_like(x), x.clone()),
        "uint8 all_gather_into_tensor": lambda: all_gather_flat(
            torch.empty(world * 8, dtype=torch.uint8, device="cuda"), x.to(torch.uint8)),
    }


def _probe(rank: int, backend: str, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=20))
    for name, call in _collectives(world).items():
        try:
            call()
            torch.cuda.synchronize()
            outcome = "OK"
        except Exception as error:  # a probe: report whatever the backend says
            outcome = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if rank == 0:
            print(f"{backend} x{world}, CUDA tensors, {name}: {outcome}", flush=True)
    dist.destroy_process_group()


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing probed")
        return 2
    for backend, world in (("gloo", 2), ("nccl", 1)):
        mp.spawn(_probe, args=(backend, world, free_port()), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
