"""The ``disttrain`` command: demo, train, coordinator, methods, bench, doctor.

Every flag is checked here, once, in the process the user started: a bad one is one line on
stderr and exit status 2, before any coordinator or worker is started. Each command first checks
its input and then returns what runs it: an error while running is a bug or a failure, and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from disttrain import doctor, method_listing
from disttrain.elastic.coordinator import Coordinator, CoordinatorConfig, PortError
from disttrain.elastic.protocol import SECRET_ENV, load_secret
from disttrain.launcher import worker
from disttrain.launcher.local import free_port, launch_local
from disttrain.logs import set_tag, setup_logging
from disttrain.methods import DEFAULT_METHOD
from disttrain.comm.layout import NODE_MODES
from disttrain.train.config import TrainConfig
from disttrain.train.flags import OneLineParser, canonical_flags

log = logging.getLogger("disttrain")

DEMO_WORKERS = 4
DEMO_STEPS = 200
DEMO_LINK_MBIT = 20.0
BENCHMARKS = ("convergence", "memory", "chaos", "kernels", "cluster", "gpu")


class UsageError(ValueError):
    """A flag's value that argparse cannot judge alone."""


Run = Callable[[], int]  # a checked command, ready to run: its exit status


def _positive(kind: type):
    """An argparse type: a number of ``kind`` that must be > 0."""

    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" errors
    return convert


def _demo_worker_flags(args: argparse.Namespace, coordinator: str) -> list[str]:
    return [
        "--coordinator", coordinator,
        "--method", args.method,
        "--steps", str(args.steps),
        "--eval-every", str(max(1, args.steps // 4)),
        "--link-mbit", str(args.link_mbit),
    ]


def _demo(args: argparse.Namespace) -> Run:
    os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))
    config = CoordinatorConfig(
        bind=f"tcp://127.0.0.1:{free_port()}", start_workers=args.workers, store_port=free_port()
    )
    flags = _demo_worker_flags(args, config.bind)
    worker.check_worker_args(worker.build_parser().parse_args(flags))
    coordinator_of_the_demo = Coordinator(config, load_secret())

    def run() -> int:
        stop = threading.Event()
        coordinator = threading.Thread(target=coordinator_of_the_demo.serve, args=(stop,), name="coordinator", daemon=True)
        coordinator.start()
        log.info(
            "demo: coordinator on %s, %d workers on localhost, method %s, %d steps, uplink paced to %.0f Mbit/s",
            config.bind, args.workers, args.method, args.steps, args.link_mbit,
        )
        try:
            return launch_local(args.workers, flags, elastic=True)
        finally:
            stop.set()
            coordinator.join(timeout=5)

    return run


def _coordinator(args: argparse.Namespace) -> Run:
    config = CoordinatorConfig(
        bind=args.bind,
        job=args.job,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        start_workers=args.start_workers,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
        store_port=args.store_port,
        refresh=args.refresh,
        energy_threshold=args.energy_threshold,
        curve_keys=args.curve_keys or "",
    )
    coordinator = Coordinator(config, load_secret(args.secret_file))

    def run() -> int:
        set_tag("coordinator")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            coordinator.serve(stop)
        except PortError as error:  # found when it binds: a port in use is the user's to change
            sys.stderr.write(f"disttrain coordinator: error: {error}\n")
            return 2
        return 0

    return run


def _train(args: argparse.Namespace, argv: list[str]) -> Run:
    """Under torchrun: be one worker (it checks its own flags). Else check everything, then start
    ``--nproc`` local workers."""
    worker_argv = _without_launch_flags(argv)
    if "RANK" in os.environ:
        return lambda: worker.main(worker_argv)
    config = worker.check_worker_args(args)
    check_local_nodes(config, args.nproc, args.nproc_per_node)
    return lambda: launch_local(args.nproc, worker_argv, elastic=bool(args.coordinator), per_node=args.nproc_per_node)


def check_local_nodes(config: TrainConfig, nproc: int, per_node: int) -> None:
    """The local processes must make whole nodes, and --inner ddp or fsdp needs nodes of several."""
    if nproc % per_node:
        raise UsageError(f"--nproc {nproc} is not a whole number of nodes of --nproc-per-node {per_node}")
    if config.inner in NODE_MODES and per_node < 2:
        raise UsageError(f"--inner {config.inner} makes a node of several processes one worker: add --nproc-per-node G (G > 1)")


LAUNCH_FLAGS = ("--nproc", "--nproc-per-node")  # what `disttrain train` takes for itself, not its workers


def _without_launch_flags(argv: list[str]) -> list[str]:
    """The ``train`` flags a worker takes: all but ``--nproc N`` and ``--nproc-per-node G``."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in LAUNCH_FLAGS:
            skip = True
        elif not token.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            kept.append(token)
    return kept


def _methods(args: argparse.Namespace) -> Run:
    def run() -> int:
        sys.stdout.write(method_listing.render(show_all=args.all) + "\n")
        return 0

    return run


def _bench(args: argparse.Namespace, extra: list[str]) -> Run:
    script = Path(args.repo) / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise UsageError(f"benchmark {script} not found: run `disttrain bench` from a disttrain checkout or pass --repo")

    def run() -> int:
        sys.argv = [str(script), *extra]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except ValueError as error:  # a benchmark checks some of its flags only as it reads them
            sys.stderr.write(f"disttrain bench: error: {error}\n")
            return 2
        return 0

    return run


def _doctor(args: argparse.Namespace) -> Run:
    return lambda: doctor.command(args)  # it reports what it finds wrong as failed checks


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo", help="train the small GPT with 4 local workers and a coordinator on an emulated slow link",
        description="A coordinator and local workers train the small GPT on the bundled text, each uplink paced.",
    )
    demo.add_argument("--workers", type=_positive(int), default=DEMO_WORKERS, metavar="N", help=f"local workers (default: {DEMO_WORKERS})")
    demo.add_argument("--steps", type=_positive(int), default=DEMO_STEPS, metavar="N", help=f"training steps (default: {DEMO_STEPS})")
    demo.add_argument("--method", default=DEFAULT_METHOD, help=f"see `disttrain methods` (default: {DEFAULT_METHOD})")
    demo.add_argument(
        "--link-mbit", type=_positive(float), default=DEMO_LINK_MBIT,
        help=f"emulated uplink of every worker in Mbit/s (default: {DEMO_LINK_MBIT:g})",
    )


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train", help="train: start --nproc local workers, or be one worker under torchrun",
        description="Train with every worker's flags below. Outside torchrun it starts --nproc local workers; "
        "under torchrun (RANK set) it is one worker, like `python -m disttrain.launcher`.",
        usage="%(prog)s [--nproc N] [--config FILE] [--FLAG VALUE ...]  (every flag below)",
    )
    train.add_argument(
        "--nproc", type=_positive(int), default=1, metavar="N", help="local processes to start when not under torchrun (default: 1)"
    )
    train.add_argument(
        "--nproc-per-node", type=_positive(int), default=1, metavar="G",
        help="local processes per emulated node, as torchrun's --nproc-per-node (default: 1, every process its own site)",
    )
    worker.add_worker_arguments(train)


def _add_coordinator(commands) -> None:
    coordinator = commands.add_parser(
        "coordinator", help="run the coordinator: membership, generations, rendezvous",
        description="The control plane of an elastic job: workers join and leave through it.",
    )
    coordinator.add_argument("--bind", default="tcp://0.0.0.0:29400", help="tcp://HOST:PORT to listen on (default: %(default)s)")
    coordinator.add_argument("--job", default="disttrain", help="job id the workers must name (default: %(default)s)")
    coordinator.add_argument("--secret-file", help=f"file holding the job secret (default: ${SECRET_ENV})")
    coordinator.add_argument("--min-workers", type=_positive(int), default=1, help="quorum: no generation with fewer (default: 1)")
    coordinator.add_argument("--max-workers", type=_positive(int), default=64, help="no generation with more (default: 64)")
    coordinator.add_argument(
        "--start-workers", type=int, default=0, help="the first generation waits for this many (default: 0, min-workers)"
    )
    coordinator.add_argument(
        "--heartbeat-timeout-s", type=_positive(float), default=3.0,
        help="a worker silent this long leaves its generation (default: 3.0)",
    )
    coordinator.add_argument("--store-port", type=int, default=0, help="rendezvous store port (default: 0, the bind port + 1)")
    coordinator.add_argument(
        "--refresh", choices=["fixed", "adaptive"], default="fixed",
        help="adaptive: also refresh SVD bases whenever rank 0 reports captured energy below --energy-threshold "
        "(default: fixed)",
    )
    coordinator.add_argument(
        "--energy-threshold", type=float, default=0.5, help="captured energy that triggers an adaptive refresh (default: 0.5)"
    )
    coordinator.add_argument(
        "--curve-keys", metavar="DIR",
        help="encrypt the control plane with ZMQ CURVE, with the key pair in DIR (made there on first use); "
        "workers then need --coordinator-key DIR/coordinator.key (default: signed, not encrypted)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="disttrain", description="Training over slow links.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_train(commands)
    _add_coordinator(commands)
    methods = commands.add_parser("methods", help="list the methods: recommended, baselines, the study's others")
    methods.add_argument("--all", action="store_true", help="show every method of the convergence study, not the best few")
    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/ (its own flags follow its name)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--repo", default=".", help="the disttrain checkout holding benchmarks/ (default: .)")
    doctor.add_arguments(commands.add_parser("doctor", help="check this machine (and a coordinator) before a run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = canonical_flags(sys.argv[1:] if argv is None else argv)
    setup_logging("main")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            run = _train(args, argv[1:])
        elif args.command == "bench":
            run = _bench(args, extra)
        else:
            run = {"demo": _demo, "methods": _methods, "coordinator": _coordinator, "doctor": _doctor}[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"disttrain {args.command}: error: {error}\n")
        return 2
    return run()


if __name__ == "__main__":
    sys.exit(main())
