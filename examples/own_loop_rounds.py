"""Your own model, optimizer and loop with the default local-step method: ``disttrain.Session``.

    torchrun --nproc-per-node 2 examples/own_loop_rounds.py

Nothing here is built by disttrain but the Session: a plain torch next-byte model (an MLP over
the last 16 bytes of a text), torch's AdamW and a cosine schedule, and a loop that reads its own
batches of bytes. With the default method, diloco-sparse-k4-h5, the optimizer's steps are local;
every 5 steps each worker sends 4 sparse votes per 256 values of its round's update and every
replica applies their mean. Rank 0 prints one JSON line at the end; the script fails if the
replicas differ.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from importlib import resources

import torch
import torch.distributed as dist
from torch import nn

import disttrain

log = logging.getLogger("own_loop_rounds")
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


def text_bytes() -> torch.Tensor:
    """Any text will do; this one is the King James Bible that ships inside the package."""
    packed = resources.files("disttrain.data").joinpath("kjv.txt.gz").read_bytes()
    return torch.frombuffer(bytearray(gzip.decompress(packed)), dtype=torch.uint8).long()


def batch(text: torch.Tensor, step: int, rank: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's batch for ``step``: its own random windows of the text."""
    generator = torch.Generator().manual_seed(1_000_003 * step + rank)
    starts = torch.randint(0, len(text) - CONTEXT - 1, (size,), generator=generator)
    windows = torch.stack([text[s : s + CONTEXT + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--method", default=disttrain.DEFAULT_METHOD, help="see `disttrain methods`")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    torch.manual_seed(rank)  # different on purpose: the session copies rank 0's weights to every rank
    model = NextByte()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps, eta_min=3e-4)
    session = disttrain.Session(model, optimizer, args.method, scheduler=scheduler, check_every=25)
    text = text_bytes()

    losses = []
    for step in range(args.steps):
        x, y = batch(text, step, rank)
        loss = nn.functional.cross_entropy(model(x), y)
        session.backward(loss)
        session.step()  # a local AdamW step; every 5th also the compressed exchange and outer step
        session.zero_grad()
        losses.append(loss.item())
        if step % 20 == 0:
            log.info("step %3d  loss %.3f  in sync %s", step, losses[-1], session.in_sync)
    session.finish()

    summary = session.summary()
    if rank == 0:
        print(json.dumps({"first_loss": sum(losses[:5]) / 5, "final_loss": sum(losses[-5:]) / 5, **summary}), flush=True)
    dist.destroy_process_group()
    if not summary["replicas_identical"]:
        raise SystemExit("replicas differ after training")


if __name__ == "__main__":
    main()
