"""Session benchmark: disttrain.Session in a user's loop against `disttrain train`, and its cost per step.

1. The same job two ways, side by side: `disttrain train --nproc 2` and a user's loop (this file,
   under torchrun) that builds the same GPT and AdamW, sets the same schedule and reads the same
   batches, with a Session. Reported: final validation loss and parameter digest of each.
2. What the object costs: one process (a world of one Gloo process), the default GPT, the same
   loop with plain optimizer.step() and through Sessions (the default local-step method and the
   per-step default), in interleaved blocks; median step time of each and the ratio to the plain loop.
3. The Hugging Face Trainer with rounds: examples/hf_gpt2_rounds.py (a small GPT-2 from a
   GPT2Config, an unmodified transformers.Trainer, 2 workers under torchrun) with the default
   method and with plain DDP, the same steps and seed: training loss and bytes of each.

    python benchmarks/session.py                 # about 10 minutes on 2 cores (needs disttrain[hf])
    python benchmarks/session.py --render-only   # the table in docs/benchmarks.md from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import disttrain
from disttrain.data.corpus import ByteCorpus
from disttrain.launcher.local import free_port
from disttrain.models.gpt import GPT
from disttrain.train.config import TrainConfig
from disttrain.train.trainer import learning_rate

sys.path.append(str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
import common  # noqa: E402

log = logging.getLogger("benchmarks.session")

MARKER = "session-table"
PER_STEP = disttrain.DEFAULT_PER_STEP_METHOD


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="steps of the side-by-side job (default: 100)")
    parser.add_argument("--timed-steps", type=int, default=60, help="timed steps per loop in the cost test (default: 60)")
    parser.add_argument("--hf-steps", type=int, default=300, help="optimizer steps of each Hugging Face run (default: 300)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "session.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table from --out")
    parser.add_argument("--user-loop-worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun worker
    return parser.parse_args(argv)


def build(config: TrainConfig, method: str | None) -> tuple[GPT, torch.optim.Optimizer, disttrain.Session | None]:
    """The GPT and AdamW as `disttrain train` builds them; a Session over them unless ``method`` is None."""
    torch.manual_seed(config.seed)
    model = GPT(config.model)
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.peak_lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    return model, optimizer, None if method is None else disttrain.Session(model, optimizer, method, seed=config.seed)


def step_once(model: GPT, optimizer: torch.optim.Optimizer, session: disttrain.Session | None, batch: Any) -> None:
    """One step of the user's loop: with a Session, its backward and step; without, plain torch."""
    _, loss = model(*batch)
    if session is None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    session.backward(loss)
    session.step()
    session.zero_grad()


def user_loop_worker(steps: int) -> None:
    """One worker of the user's-loop job: `disttrain train`'s schedule and batches through a Session."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = TrainConfig(steps=steps)
    model, optimizer, session = build(config, config.method_name)
    corpus = ByteCorpus(config.data, config.seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        step_once(model, optimizer, session, corpus.train_batch(step, rank, world))
    session.finish()
    model.eval()
    with torch.no_grad():
        losses = [model(*batch)[1].item() for batch in corpus.val_batches()]
    if rank == 0:
        print(json.dumps({"val_loss": sum(losses) / len(losses), **session.summary()}), flush=True)
    dist.destroy_process_group()


def last_json(text: str) -> dict[str, Any]:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def side_by_side(steps: int) -> list[dict[str, Any]]:
    """The same job through `disttrain train` and through a user's loop with a Session."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["disttrain", "train", "--nproc", "2", "--steps", str(steps), "--eval-every", str(steps)]
    user = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(Path(__file__).resolve()), "--user-loop-worker", "--steps", str(steps),
    ]
    rows = []
    for name, command in (("disttrain train", cli), ("your loop + Session", user)):
        started = time.monotonic()
        run = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        summary = last_json(run.stdout)
        rows.append({
            "path": name, "command": shlex.join(command), "val_loss": summary["val_loss"],
            "parameter_digest": summary["parameter_digest"], "bytes_per_step": summary["bytes_per_step"],
            "wall_s": time.monotonic() - started,
        })
        log.info("%s: val loss %.4f, digest %s", name, summary["val_loss"], summary["parameter_digest"])
    return rows


def hugging_face(steps: int) -> list[dict[str, Any]]:
    """examples/hf_gpt2_rounds.py with the default method and with plain DDP, one after the other."""
    example = Path(__file__).resolve().parents[1] / "examples" / "hf_gpt2_rounds.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for method in (TrainConfig().method_name, "ddp"):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(example), "--steps", str(steps), "--method", method,
        ]
        started = time.monotonic()
        summary = last_json(subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout)
        rows.append({**summary, "command": shlex.join(command), "wall_s": time.monotonic() - started})
        log.info("Hugging Face Trainer, %s: loss %.4f at %d bytes/step", method, summary["final_loss"], summary["bytes_per_step"])
    return rows


def step_costs(timed_steps: int, block: int = 10) -> list[dict[str, Any]]:
    """Median step time of the plain loop and of Sessions, in one process, interleaved in blocks."""
    torch.set_num_threads(1)  # as every worker runs: the other core stays free, and the timing steadier
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    config = TrainConfig()
    corpus = ByteCorpus(config.data, config.seed)
    loops = {name: build(config, method) for name, method in (("plain", None), (config.method_name, config.method_name), (PER_STEP, PER_STEP))}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for name, loop in loops.items():  # warm-up
        for step in range(3):
            step_once(*loop, corpus.train_batch(step, 0, 1))
    for start in range(0, timed_steps, block):
        for name, loop in loops.items():
            for step in range(start, start + block):
                began = time.perf_counter()
                step_once(*loop, corpus.train_batch(step, 0, 1))
                times[name].append(time.perf_counter() - began)
    dist.destroy_process_group()
    plain = statistics.median(times["plain"])
    return [
        {"loop": name, "median_step_ms": 1000 * statistics.median(t), "ratio_to_plain": statistics.median(t) / plain}
        for name, t in times.items()
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "machine": common.machine_description(),
        "command": shlex.join(["python", "benchmarks/session.py", *sys.argv[1:]]),
        "steps": args.steps,
        "side_by_side": side_by_side(args.steps),
        "step_costs": step_costs(args.timed_steps),
        "hf_steps": args.hf_steps,
        "hugging_face": hugging_face(args.hf_steps),
    }


def table(results: dict[str, Any], out: Path) -> str:
    same = results["side_by_side"]
    identical = len({row["parameter_digest"] for row in same}) == 1
    lines = [
        common.markdown_table(
            ["path", "final val loss", "parameter digest", "payload/step"],
            [[r["path"], f"{r['val_loss']:.4f}", f"`{r['parameter_digest']}`", common.human_bytes(r["bytes_per_step"])] for r in same],
        ),
        "",
        f"The default method ({TrainConfig().method_name}), the default GPT, 2 workers over Gloo, {results['steps']} steps, "
        f"seed 0: the two paths end {'bit-identical' if identical else 'with DIFFERENT parameters'}.",
        "",
        common.markdown_table(
            ["loop (1 process)", "median step", "x the plain loop"],
            [[r["loop"], f"{r['median_step_ms']:.1f} ms", f"{r['ratio_to_plain']:.3f}"] for r in results["step_costs"]],
        ),
        "",
        f"Measured on {common.machine_line(results['machine'])}: one process with one thread (a world of one Gloo "
        "process), the default GPT, batch 8 x 128; the same steps with plain optimizer.step() and through Sessions, timed in interleaved "
        "blocks of 10 steps after 3 warm-up steps.",
        "",
        common.markdown_table(
            ["Hugging Face Trainer", "training loss (last 5 steps)", "exchanges", "payload/step", "compression"],
            [
                [r["method"], f"{r['final_loss']:.3f}", str(r["exchanges"]), common.human_bytes(r["bytes_per_step"]),
                 f"{r['compression_ratio']:.0f}x"]
                for r in results["hugging_face"]
            ],
        ),
        "",
        f"examples/hf_gpt2_rounds.py: a GPT-2 built from a GPT2Config (2 layers, width 128, byte-level ids, "
        f"64-byte blocks, batch 16 per worker) trained by an unmodified transformers.Trainer on 2 workers over "
        f"Gloo, {results['hf_steps']} optimizer steps, seed 0, the method's own peak lr; plain DDP is Trainer "
        "without disttrain. " + common.generated_by(results["command"], out),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.user_loop_worker:
        user_loop_worker(args.steps)
        return 0
    common.setup_logging()
    results = common.run_or_reread(args.render_only, args.out, lambda: run(args))
    if results is None:
        return 1
    common.publish_table(table(results, args.out), MARKER, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
