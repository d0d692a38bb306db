"""The ``disttrain`` command: demo, train, coordinator, methods, bench, doctor."""

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

from disttrain import doctor
from disttrain.elastic.coordinator import Coordinator, CoordinatorConfig
from disttrain.elastic.protocol import SECRET_ENV, load_secret
from disttrain.launcher import worker
from disttrain.launcher.local import free_port, launch_local
from disttrain.methods import DEFAULT_METHOD, METHODS

DEMO_WORKERS = 4
DEMO_STEPS = 200
DEMO_LINK_MBIT = 20.0
BENCHMARKS = ("convergence", "memory", "chaos", "kernels", "cluster")


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))
    config = CoordinatorConfig(
        bind=f"tcp://127.0.0.1:{free_port()}", start_workers=args.workers, store_port=free_port()
    )
    stop = threading.Event()
    coordinator = threading.Thread(
        target=Coordinator(config, load_secret()).serve, args=(stop,), name="coordinator", daemon=True
    )
    coordinator.start()
    flags = [
        "--coordinator", config.bind,
        "--method", args.method,
        "--steps", str(args.steps),
        "--eval_every", str(max(1, args.steps // 4)),
        "--link_mbit", str(args.link_mbit),
    ]
    logging.info(
        "demo: coordinator on %s, %d workers on localhost, method %s, %d steps, uplink paced to %.0f Mbit/s",
        config.bind, args.workers, args.method, args.steps, args.link_mbit,
    )
    try:
        return launch_local(args.workers, flags)
    finally:
        stop.set()
        coordinator.join(timeout=5)


def _coordinator(args: argparse.Namespace) -> int:
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
    )
    try:
        coordinator = Coordinator(config, load_secret(args.secret_file))
    except (ValueError, FileNotFoundError) as error:
        logging.error("%s", error)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    coordinator.serve(stop)
    return 0


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    if "RANK" in os.environ:
        return worker.main(extra)
    return launch_local(args.nproc, extra)


def _methods(_: argparse.Namespace) -> int:
    width = max(map(len, METHODS))
    for name, method in METHODS.items():
        marker = "*" if name == DEFAULT_METHOD else " "
        sys.stdout.write(f"{marker} {name:<{width}}  lr {method.lr:<6g} {method.summary}\n")
    return 0


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    script = Path(args.repo) / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        logging.error("benchmark %s not found: run `disttrain bench` from a disttrain checkout or pass --repo", script)
        return 2
    sys.argv = [str(script), *extra]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disttrain", description="Training over slow links.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the small GPT with 4 local workers on an emulated slow link")
    demo.add_argument("--workers", type=int, default=DEMO_WORKERS)
    demo.add_argument("--steps", type=int, default=DEMO_STEPS)
    demo.add_argument("--method", default=DEFAULT_METHOD, help="see `disttrain methods`")
    demo.add_argument("--link-mbit", type=float, default=DEMO_LINK_MBIT, help="emulated uplink of every worker")

    train = commands.add_parser(
        "train",
        help="train (under torchrun, or start --nproc local workers); other flags: python -m disttrain.launcher -h",
    )
    train.add_argument("--nproc", type=int, default=1, help="local workers to start when not under torchrun")

    coordinator = commands.add_parser("coordinator", help="run the coordinator: membership, generations, rendezvous")
    coordinator.add_argument("--bind", default="tcp://0.0.0.0:29400", help="tcp://HOST:PORT to listen on")
    coordinator.add_argument("--job", default="disttrain", help="job id the workers must name")
    coordinator.add_argument("--secret-file", help=f"file holding the job secret (default: ${SECRET_ENV})")
    coordinator.add_argument("--min-workers", type=int, default=1, help="quorum: no generation with fewer")
    coordinator.add_argument("--max-workers", type=int, default=64)
    coordinator.add_argument("--start-workers", type=int, default=0, help="the first generation waits for this many")
    coordinator.add_argument("--heartbeat-timeout-s", type=float, default=3.0)
    coordinator.add_argument("--store-port", type=int, default=0, help="rendezvous store port (default: bind port + 1)")
    coordinator.add_argument(
        "--refresh", choices=["fixed", "adaptive"], default="fixed",
        help="adaptive: also refresh SVD bases whenever rank 0 reports captured energy below --energy-threshold",
    )
    coordinator.add_argument("--energy-threshold", type=float, default=0.5)

    commands.add_parser("methods", help="list the registered methods (* marks the default)")

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--repo", default=".", help="the disttrain checkout holding benchmarks/")

    doctor.add_arguments(commands.add_parser("doctor", help="check this machine (and a coordinator) before a run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "train":
        return _train(args, extra)
    if args.command == "bench":
        return _bench(args, extra)
    if extra:
        logging.error("unrecognised arguments: %s", " ".join(extra))
        return 2
    return {"demo": _demo, "methods": _methods, "coordinator": _coordinator, "doctor": doctor.command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
