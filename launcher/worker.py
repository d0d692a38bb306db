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

from disttrain.comm.device import device_type, resolve_device
from disttrain.comm.layout import check_elastic_inner
from disttrain.comm.process_group import close_process_group
from disttrain.elastic.agent import CoordinatorUnreachable, GenerationTimeout, JobFinished, WorkerRefused
from disttrain.elastic.curve import COORDINATOR_KEY_ENV, coordinator_public_key, resolve_coordinator_key
from disttrain.elastic.membership import ElasticConfig
from disttrain.elastic.node import NodeLost, node_identity
from disttrain.exchange.membership import ElasticGroup
from disttrain.elastic.protocol import SECRET_ENV, check_address, load_secret
from disttrain.logs import set_tag, setup_logging
from disttrain.methods import get_method
from disttrain.train.config import TrainConfig
from disttrain.train.flags import OneLineParser, add_config_flags, config_from_args
from disttrain.train.trainer import ConfigMismatch, RunSummary, Trainer

log = logging.getLogger("disttrain.worker")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKER_USAGE = "%(prog)s [--config FILE] [--FLAG VALUE ...]  (every flag below)"


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of a training worker: the process, elastic membership, then the run's config."""
    process = parser.add_argument_group("process")
    process.add_argument("--config", metavar="FILE", help="TOML or JSON file with config fields; flags override it")
    process.add_argument(
        "--backend", choices=["auto", "gloo", "nccl"], default="auto",
        help="collective backend; auto: NCCL with a GPU per local worker, else Gloo (default: auto)",
    )
    process.add_argument(
        "--summary-file", metavar="FILE",
        help="rank 0 also writes the summary (with history) here; with {pid} in the name, every worker does",
    )
    process.add_argument("--timeout-s", type=float, metavar="S", default=300.0, help="collective timeout in seconds (default: 300)")
    process.add_argument("--log-all-ranks", action="store_true", help="INFO logs from every worker, not only rank 0")
    elastic = parser.add_argument_group("elastic membership (ranks come from the coordinator, not torchrun)")
    elastic.add_argument("--coordinator", metavar="tcp://HOST:PORT", help="address of a running `disttrain coordinator`")
    elastic.add_argument("--job", default="disttrain", metavar="ID", help="job id; must match the coordinator's (default: disttrain)")
    elastic.add_argument("--secret-file", metavar="FILE", help=f"file holding the job secret (default: ${SECRET_ENV})")
    elastic.add_argument(
        "--coordinator-key", metavar="FILE|KEY",
        help="the coordinator's CURVE public key (its --curve-keys folder's coordinator.key, or the key in Z85) "
        f"when it encrypts the control plane (default: ${COORDINATOR_KEY_ENV}, else plain text)",
    )
    elastic.add_argument("--heartbeat-s", type=float, metavar="S", default=0.25, help="seconds between heartbeats (default: 0.25)")
    elastic.add_argument("--sync-every", type=int, metavar="N", default=5, help="steps between membership checks (default: 5)")
    elastic.add_argument(
        "--connect-timeout-s", type=float, metavar="S", default=60.0,
        help="give up when the coordinator has not answered usably for this long (default: 60)",
    )
    add_config_flags(parser)


def build_parser(prog: str = "python -m disttrain.launcher") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__, usage=WORKER_USAGE)
    add_worker_arguments(parser)
    return parser


def check_worker_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the flags, validated, with the worker's own flags checked: what
    ``disttrain train`` runs once before it starts any worker."""
    for name in ("timeout_s", "heartbeat_s", "sync_every", "connect_timeout_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.coordinator:
        check_address(args.coordinator)
        resolve_coordinator_key(args.coordinator_key)
    elif args.coordinator_key:
        coordinator_public_key(args.coordinator_key)
    config = config_from_args(args)
    resolve_backend(args.backend, torch.device(device_type(config.device)))
    if args.coordinator:
        get_method(config.method_name).require_elastic()
        check_elastic_inner(config.inner)
        node_identity(config.inner)  # refuses a node mode without several processes per node
    return config


class NotLaunched(RuntimeError):
    """The process was started without the variables torchrun sets."""


def select_device(config: TrainConfig) -> torch.device:
    """The training device; on a GPU node each local rank takes its own GPU (LOCAL_RANK)."""
    if config.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return resolve_device(config.device)


def resolve_backend(backend: str, device: torch.device, local_workers: int = 1) -> str:
    """auto: NCCL for GPU training with a GPU per local worker, else Gloo (which also moves CUDA
    tensors, so several workers can share one GPU)."""
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("--backend nccl moves CUDA tensors only: train with --device cuda, or use --backend gloo")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "gloo"
    return "nccl" if local_workers <= torch.cuda.device_count() else "gloo"


def init_process_group(backend: str, timeout_s: float) -> None:
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise NotLaunched(
            f"environment variables {', '.join(missing)} are not set: start workers with "
            "`torchrun --nproc-per-node N -m disttrain.launcher ...` or `disttrain train --nproc N`"
        )
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def elastic_membership(args: argparse.Namespace, config: TrainConfig, backend: str) -> ElasticGroup:
    """This worker's place in the coordinator's job (the Session joins it); the job's fingerprint is the config's."""
    settings = ElasticConfig(sync_every=args.sync_every, collective_timeout_s=args.timeout_s, backend=backend)
    members = ElasticGroup.connect(
        args.coordinator, args.job, load_secret(args.secret_file), config.fingerprint(), args.heartbeat_s,
        args.connect_timeout_s, settings, resolve_coordinator_key(args.coordinator_key), node_identity(config.inner),
    )
    set_tag(lambda: members.agent.name)
    return members


def write_summary(path: str, config: TrainConfig, summary: RunSummary) -> None:
    record = {"config": config.to_dict(), **summary.headline(), "history": [vars(p) for p in summary.history]}
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    static_rank = os.environ.get("RANK", "0")
    # Under a coordinator, ranks are known only once a generation forms, and change over time.
    setup_logging(
        f"pid{os.getpid()}" if args.coordinator else f"w{static_rank}",
        logging.INFO if args.coordinator or static_rank == "0" else logging.WARNING,
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    membership, started = None, False
    try:
        config = check_worker_args(args)
        local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        backend = resolve_backend(args.backend, select_device(config), local_workers)
        if args.coordinator:
            membership = elastic_membership(args, config, backend)
        else:
            init_process_group(backend, args.timeout_s)
        trainer = Trainer(config, membership=membership)
        if trainer.rank != 0 and not args.log_all_ranks:
            logging.getLogger().setLevel(logging.WARNING)
        started = True
        summary = trainer.run()  # under a coordinator, the session tells it the job finished, and leaves
    except JobFinished as finished:
        log.info("%s", finished)
        return 0
    except NodeLost as lost:
        log.error("%s", lost)
        return 1
    except (ConfigMismatch, NotLaunched, WorkerRefused, CoordinatorUnreachable, GenerationTimeout) as error:
        log.error("%s", error)
        return 2
    except (ValueError, FileNotFoundError) as error:
        if started:
            raise  # not bad input but a failure while training: its traceback says where
        log.error("%s", error)
        return 2
    finally:
        if membership is not None:
            membership.agent.stop(leave=True)
    if args.summary_file and (trainer.rank == 0 or "{pid}" in args.summary_file):
        write_summary(args.summary_file.replace("{pid}", str(os.getpid())), config, summary)
    if trainer.rank == 0:
        print(json.dumps(summary.headline()), flush=True)
    if membership is None:
        del trainer  # its engine (torch DDP in particular) keeps the process group alive
        close_process_group()
    return 0 if summary.replicas_identical else 1


if __name__ == "__main__":
    sys.exit(main())
