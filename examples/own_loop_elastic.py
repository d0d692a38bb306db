"""Your own loop in an elastic job: workers may die or join mid-run, with no torchrun.

    export DISTTRAIN_SECRET=$(openssl rand -hex 32)
    disttrain coordinator --bind tcp://0.0.0.0:29400 --start-workers 2 &
    python examples/own_loop_elastic.py --coordinator tcp://127.0.0.1:29400 &   # on every worker
    python examples/own_loop_elastic.py --coordinator tcp://127.0.0.1:29400 &

The model, data and optimizer of own_loop_rounds.py under a Session that forms its process group
through the coordinator. A worker killed mid-run is dropped and the others redo their round's
exchange without it; a worker started mid-run receives a donor's state, steps included, and its
loop starts where the job stands: ``while session.steps < args.steps``. Every worker prints one
JSON line (session.summary()) at the end; every one ends with the same parameter digest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from own_loop_rounds import NextByte, batch, text_bytes
from torch import nn

import disttrain

log = logging.getLogger("own_loop_elastic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", help="tcp://HOST:PORT (default: $DISTTRAIN_COORDINATOR)")
    parser.add_argument("--job", default="disttrain")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--method", default=disttrain.DEFAULT_METHOD, help="a per-step or local-step method (see `disttrain methods`)")
    parser.add_argument("--link-mbit", type=float, default=None, help="emulate a link this slow (megabits per second)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[pid{os.getpid()}] %(message)s")
    torch.set_num_threads(1)

    torch.manual_seed(os.getpid())  # different on purpose: every member ends up with the first generation's rank 0's
    model = NextByte()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps, eta_min=3e-4)
    session = disttrain.Session(
        model, optimizer, args.method, scheduler=scheduler, coordinator=args.coordinator, job=args.job,
        link_mbit=args.link_mbit,
    )
    text = text_bytes()

    started_at = session.steps  # a joiner starts where the job stands
    while session.steps < args.steps:
        step = session.steps
        x, y = batch(text, step, torch.distributed.get_rank())
        loss = nn.functional.cross_entropy(model(x), y)
        session.backward(loss)
        session.step()  # a local AdamW step; every 5th also the exchange, a regroup when members changed
        session.zero_grad()
        if step % 10 == 0:
            log.info("step %3d: loss %.3f", step, loss.item())
    session.finish()
    print(json.dumps({"started_at": started_at, **session.summary()}), flush=True)


if __name__ == "__main__":
    main()
