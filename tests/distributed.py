"""Run a function in N real processes joined by a real Gloo process group.

The processes are kept between calls, one set per world size: importing torch and disttrain
costs seconds per process, more than most tests' training. Every call still gets a process group
of its own (a fresh rendezvous port, destroyed afterwards), this process's environment as it was
before the call, and torch's random state of a fresh process. A call that fails or times out
retires its processes, and calls whose ranks exit on purpose (``vanishing_ranks``) get fresh ones.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disttrain.launcher.local import free_port

_CONTEXT = mp.get_context("spawn")


@dataclass(frozen=True)
class Task:
    """One call, as one rank runs it."""

    fn: Callable
    world_size: int
    port: int
    args: tuple
    per_node: int
    backend: str


def _run(task: Task, rank: int, results: Any) -> None:
    """Join the task's process group as ``rank``, call its function, and put the outcome on ``results``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(task.port), RANK=str(rank), WORLD_SIZE=str(task.world_size))
    # torchrun's view of nodes: ranks numbered node by node
    os.environ.update(
        LOCAL_RANK=str(rank % task.per_node), LOCAL_WORLD_SIZE=str(task.per_node), GROUP_RANK=str(rank // task.per_node)
    )
    if task.backend == "nccl":
        torch.cuda.set_device(rank % task.per_node)
    try:
        dist.init_process_group(task.backend, rank=rank, world_size=task.world_size, timeout=timedelta(seconds=60))
        # Serialise to bytes: tensors sent as-is would point at this process's shared memory.
        buffer = io.BytesIO()
        torch.save(task.fn(rank, task.world_size, *task.args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, whatever it is
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _once(task: Task, rank: int, results: Any) -> None:
    torch.set_num_threads(1)
    _run(task, rank, results)


def _serve(rank: int, tasks: Any, results: Any) -> None:
    """A kept process: run tasks as ``rank`` until told to stop (None), each as if in a fresh process."""
    torch.set_num_threads(1)
    seed, environment = torch.initial_seed(), dict(os.environ)
    while (task := tasks.get()) is not None:
        torch.manual_seed(seed)
        try:
            _run(task, rank, results)
        finally:
            os.environ.clear()
            os.environ.update(environment)


class WorkerSet:
    """``world_size`` kept processes, one task queue each, one results queue."""

    def __init__(self, world_size: int):
        self.results = _CONTEXT.Queue()
        self.tasks = [_CONTEXT.Queue() for _ in range(world_size)]
        self.procs = [
            _CONTEXT.Process(target=_serve, args=(rank, self.tasks[rank], self.results), daemon=True)
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def submit(self, task: Task) -> None:
        for tasks in self.tasks:
            tasks.put(task)

    def retire(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.join(timeout=10)


_KEPT: dict[int, WorkerSet] = {}


def _retire_all() -> None:
    for workers in _KEPT.values():
        workers.retire()


atexit.register(_retire_all)


def _kept_workers(world_size: int) -> WorkerSet:
    workers = _KEPT.get(world_size)
    if workers is None or not workers.alive():
        workers = _KEPT[world_size] = WorkerSet(world_size)
    return workers


def _collect(results: Any, expected: int, timeout_s: float) -> tuple[dict[int, Any], list[str]]:
    """``expected`` outcomes from ``results``: values by rank, and the errors."""
    collected: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(expected):
            rank, status, value = results.get(timeout=timeout_s)
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
            collected[rank] = value if status == "error" else torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty:
        errors.append(f"workers did not finish within {timeout_s} s")
    return collected, errors


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
    task = Task(fn, world_size, free_port(), args, per_node, backend)
    if vanishing_ranks:
        results = _CONTEXT.Queue()
        procs = [_CONTEXT.Process(target=_once, args=(task, rank, results)) for rank in range(world_size)]
        for proc in procs:
            proc.start()
        collected, errors = _collect(results, world_size - len(vanishing_ranks), timeout_s)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    else:
        workers = _kept_workers(world_size)
        workers.submit(task)
        collected, errors = _collect(workers.results, world_size, timeout_s)
        if errors:  # its processes may be stuck in a collective, or hold a half-torn group: start afresh next time
            workers.retire()
            del _KEPT[world_size]
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected.get(rank) for rank in range(world_size)]
