"""The ``disttrain`` command: demo, train, methods, bench."""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
from pathlib import Path

from disttrain.launcher import worker
from disttrain.launcher.local import launch_local
from disttrain.methods import DEFAULT_METHOD, METHODS

DEMO_WORKERS = 4
DEMO_STEPS = 200
DEMO_LINK_MBIT = 20.0
BENCHMARKS = ("convergence", "memory")


def _demo(args: argparse.Namespace) -> int:
    flags = [
        "--method", args.method,
        "--steps", str(args.steps),
        "--eval_every", str(max(1, args.steps // 4)),
        "--link_mbit", str(args.link_mbit),
    ]
    logging.info(
        "demo: %d workers on localhost, method %s, %d steps, uplink paced to %.0f Mbit/s",
        args.workers, args.method, args.steps, args.link_mbit,
    )
    return launch_local(args.workers, flags)


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    if "RANK" in os.environ:
        return worker.main(extra)
    return launch_local(args.nproc, extra)


def _methods(_: argparse.Namespace) -> int:
    width = max(map(len, METHODS))
    for name, method in METHODS.items():
        marker = "*" if name == DEFAULT_METHOD else " "
        sys.stdout.write(f"{marker} {name:<{width}}  {method.summary}\n")
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

    commands.add_parser("methods", help="list the registered methods (* marks the default)")

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--repo", default=".", help="the disttrain checkout holding benchmarks/")
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
    return {"demo": _demo, "methods": _methods}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
