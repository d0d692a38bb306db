"""Plain torch DDP with disttrain's comm hook: the one-line change is register_comm_hook.

    torchrun --nproc-per-node 2 examples/ddp_comm_hook.py

A student MLP learns a fixed random teacher from synthetic batches (different on every rank).
Rank 0 logs the loss and the bytes each worker sent against a dense all-reduce; at the end
every rank compares a digest of its parameters and the script fails if any differ.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from disttrain.comm import DisttrainHookState, disttrain_hook
from disttrain.comm.process_group import close_process_group
from disttrain.compress import CompressionSpec
from disttrain.train.replica import parameter_digest

log = logging.getLogger("ddp_comm_hook")


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16))


def batch(teacher: nn.Module, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1000 * step + rank))
    with torch.no_grad():
        return x, 10 * teacher(x)  # targets of about unit scale


def replicas_identical(model: nn.Module) -> bool:
    digests: list[bytes | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, parameter_digest(model))
    return len(set(digests)) == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8, help="rank of the gradient projection")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    teacher, model = mlp(seed=0), mlp(seed=1 + rank)  # DDP copies rank 0's weights to all ranks
    ddp = DistributedDataParallel(model)
    state = DisttrainHookState(model.parameters(), CompressionSpec(basis="seeded", rank=args.rank, payload="int8"))
    ddp.register_comm_hook(state, disttrain_hook)  # the one-line change
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)

    dense = sum(p.numel() * 4 for p in model.parameters())
    losses = []
    for step in range(args.steps):
        x, y = batch(teacher, rank, step)
        sent_before = state.payload_bytes
        loss = nn.functional.mse_loss(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP calls disttrain_hook for each bucket
        optimizer.step()
        sent = state.payload_bytes - sent_before
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            log.info(
                "step %3d  loss %.4f  sent %d B  (dense %d B, %.0fx less)", step, losses[-1], sent, dense, dense / sent
            )

    identical = replicas_identical(model)
    summary = {
        "first_loss": sum(losses[:5]) / 5,
        "final_loss": sum(losses[-5:]) / 5,
        "bytes_per_step": state.payload_bytes / args.steps,
        "dense_bytes_per_step": dense,
        "replicas_identical": identical,
    }
    log.info(json.dumps(summary))
    del ddp  # DDP keeps the process group alive
    close_process_group()
    if not identical:
        raise SystemExit("replicas differ after training")


if __name__ == "__main__":
    main()
