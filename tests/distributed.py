"""Run a function in N real processes joined by a real Gloo process group."""

from __future__ import annotations

import io
import os
import queue
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disttrain.launcher.local import free_port


def _entry(
    fn: Callable, rank: int, world_size: int, port: int, results: Any, args: tuple, per_node: int, backend: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    # torchrun's view of nodes: ranks numbered node by node
    os.environ.update(LOCAL_RANK=str(rank % per_node), LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK=str(rank // per_node))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank % per_node)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        # Serialise to bytes: tensors sent as-is would point at this process's shared memory.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, whatever it is
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout_s: float = 180,
    vanishing_ranks: tuple[int, ...] = (),
    per_node: int = 1,
    backend: str = "gloo",
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; returns results by rank.

    ``fn`` must be a module-level function. Any worker's exception fails the call with its
    traceback. Ranks in ``vanishing_ranks`` are expected to exit without a result (None).
    ``per_node`` processes share a node, as torchrun's --nproc-per-node sets them up. ``backend``:
    the process group's (NCCL gives every process the GPU of its LOCAL_RANK).
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [
        context.Process(target=_entry, args=(fn, rank, world_size, port, results, args, per_node, backend))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size - len(vanishing_ranks)):
            rank, status, value = results.get(timeout=timeout_s)
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
            collected[rank] = value if status == "error" else torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty:
        errors.append(f"workers did not finish within {timeout_s} s")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected.get(rank) for rank in range(world_size)]
