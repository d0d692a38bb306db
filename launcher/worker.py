"""One training worker: joins the process group that torchrun (or launch_local) describes, trains,
and prints the run's summary as one JSON line on rank 0."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from disttrain.train.config import add_config_flags, config_from_args
from disttrain.train.trainer import Trainer

log = logging.getLogger("disttrain.worker")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m disttrain.launcher", description=__doc__)
    parser.add_argument("--config", help="TOML or JSON file with config fields; flags override it")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--summary-file", help="also write the summary (with history) as JSON here")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    add_config_flags(parser)
    return parser


class NotLaunched(RuntimeError):
    """The process was started without the variables torchrun sets."""


def init_process_group(backend: str, timeout_s: float) -> None:
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise NotLaunched(
            f"environment variables {', '.join(missing)} are not set: start workers with "
            "`torchrun --nproc-per-node N -m disttrain.launcher ...` or `disttrain train --nproc N`"
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        format=f"[rank {os.environ.get('RANK', '?')}] %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        config = config_from_args(args)
        init_process_group(args.backend, args.timeout_s)
    except (ValueError, FileNotFoundError, NotLaunched) as error:
        log.error("%s", error)
        return 2
    try:
        summary = Trainer(config).run()
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if os.environ["RANK"] == "0":
        if args.summary_file:
            with open(args.summary_file, "w") as handle:
                json.dump({"config": config.to_dict(), **summary.headline(), "history": [vars(p) for p in summary.history]}, handle, indent=1)
        print(json.dumps(summary.headline()), flush=True)
    return 0 if summary.replicas_identical else 1


if __name__ == "__main__":
    sys.exit(main())
