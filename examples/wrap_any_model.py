"""Your own model, optimizer and loop, averaged by disttrain: ``disttrain.wrap``.

    torchrun --nproc-per-node 2 examples/wrap_any_model.py

A plain torch next-byte model (an MLP over the last 16 bytes) learns the bundled King James
text with torch's AdamW; each rank reads its own batches. Rank 0 logs the loss and the bytes sent
against a dense all-reduce; at the end the ranks compare parameter digests and the script
fails if they differ.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
import torch.distributed as dist
from torch import nn

import disttrain
from disttrain.comm.process_group import close_process_group
from disttrain.data import ByteCorpus, DataConfig
from disttrain.methods import DEFAULT_PER_STEP_METHOD

log = logging.getLogger("wrap_any_model")
CONTEXT = 16


class NextByte(nn.Module):
    """Embeds the last CONTEXT bytes and predicts the next one through one hidden layer."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.hidden = nn.Linear(CONTEXT * 64, width)
        self.out = nn.Linear(width, 256)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(context).flatten(1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--method", default=DEFAULT_PER_STEP_METHOD, help="a method wrap supports (the error for any other lists them)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    torch.manual_seed(rank)  # different on purpose: wrap copies rank 0's weights to every rank
    model = NextByte()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dt = disttrain.wrap(model, optimizer, method=args.method)
    corpus = ByteCorpus(DataConfig(batch_size=64, block_size=CONTEXT), seed=0)

    losses, sent = [], 0
    for step in range(args.steps):
        x, y = corpus.train_batch(step, rank, world)
        loss = nn.functional.cross_entropy(model(x), y[:, -1])
        dt.backward(loss)  # the hooks launch compressed collectives while backward runs
        dt.step()  # averaged gradients into .grad, optimizer.step(), error feedback committed
        dt.zero_grad()
        losses.append(loss.item())
        sent += dt.bytes_last_step
        if step % 10 == 0 or step == args.steps - 1:
            dense = dt.dense_bytes_per_step
            log.info(
                "step %3d  loss %.3f  sent %d B  (dense %d B, %.0fx less)",
                step, losses[-1], dt.bytes_last_step, dense, dense / dt.bytes_last_step,
            )

    identical = dt.check_replicas()
    log.info(json.dumps({
        "first_loss": sum(losses[:5]) / 5,
        "final_loss": sum(losses[-5:]) / 5,
        "bytes_per_step": sent / args.steps,
        "dense_bytes_per_step": dt.dense_bytes_per_step,
        "replicas_identical": identical,
        "parameters_digest": dt.parameters_digest()[:16],
    }))
    close_process_group()
    if not identical:
        raise SystemExit("replicas differ after training")


if __name__ == "__main__":
    main()
