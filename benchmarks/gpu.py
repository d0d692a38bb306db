"""GPU benchmark (CUDA): the default method training on one GPU, its step and round times, and memory.

Every run trains the default method (diloco-sparse-k4-h5: rounds of 5 local AdamW steps, then the
sparse votes of the round's pseudo-gradient) in bf16 autocast on one GPU. Four workers share the GPU
over Gloo (CUDA tensors; Gloo stages them through the host), the layout of a node whose processes
each stand for a site; one worker alone on NCCL is the GPU's own speed with nothing shared. Each
run is timed step by step (CUDA synchronised on both sides): a step that ends a round carries the
exchange (encode the votes, all_gather, the mean, the outer step), so a round's exchange costs the
median round-end step less the median local step, and its share of the round is that over the
median round. The first round (autotuning, allocator warm-up) is left out. Runs with the hot path on
torch (DISTTRAIN_KERNELS=torch) sit beside those on the Triton kernels (the default on CUDA).

    python benchmarks/gpu.py
    python benchmarks/gpu.py --render-only   # the table and plot in docs/ from the existing JSON (no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disttrain.launcher.local import free_port
from disttrain.methods import DEFAULT_METHOD, get_method
from disttrain.models.gpt import GPTConfig
from disttrain.train.config import DataConfig, TrainConfig
from disttrain.train.trainer import Trainer

sys.path.append(str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
import common  # noqa: E402

log = logging.getLogger("benchmarks.gpu")

MARKER = "gpu-table"
# GPT-2 small's shape (12 x 768, 50304-entry vocabulary: 124 M parameters) on the bundled bytes.
MODELS = {
    "gpt-3m": (GPTConfig(), DataConfig()),
    "gpt-124m": (GPTConfig(vocab_size=50304, block_size=256, n_layer=12, n_head=12, n_embd=768), DataConfig(block_size=256)),
}
Kernels = Literal["triton", "torch"]
ROUND_STEPS = get_method(DEFAULT_METHOD).local_steps


@dataclass(frozen=True)
class Run:
    model: str
    workers: int
    backend: Literal["gloo", "nccl"]
    kernels: Kernels
    steps: int

    @property
    def label(self) -> str:
        return f"{self.model}, {self.workers} worker{'s' * (self.workers > 1)} ({self.backend}), hot path on {self.kernels}"


RUNS = (
    Run("gpt-3m", 4, "gloo", "triton", 60),
    Run("gpt-3m", 4, "gloo", "torch", 60),
    Run("gpt-124m", 4, "gloo", "triton", 30),
    Run("gpt-124m", 4, "gloo", "torch", 30),
    Run("gpt-124m", 1, "nccl", "triton", 30),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="all", help="comma-separated indices into RUNS, or all")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "gpu.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--plot", type=Path, default=common.REPO_ROOT / "docs" / "gpu_round_time.png")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table and plot from --out")
    return parser.parse_args(argv)


def config_for(run: Run) -> TrainConfig:
    model, data = MODELS[run.model]
    return TrainConfig(
        method=DEFAULT_METHOD, steps=run.steps, device="cuda", precision="bf16", model=model, data=data,
        eval_every=run.steps, digest_every=run.steps,
    )


def _worker(rank: int, run: Run, port: int, folder: str) -> None:
    """One worker: train, timing every step, and write what it measured to ``folder``/<rank>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(run.workers),
                      LOCAL_RANK=str(rank), DISTTRAIN_KERNELS=run.kernels)
    torch.cuda.set_device(0)
    dist.init_process_group(run.backend, rank=rank, world_size=run.workers, timeout=timedelta(seconds=300))
    try:
        trainer = Trainer(config_for(run), progress=False)
        session, times, exchanged = trainer.session, [], []
        step = session.step

        def timed(closure: Any) -> Any:
            torch.cuda.synchronize()
            started = time.perf_counter()
            loss = step(closure)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            exchanged.append(session.bytes_last_step > 0)
            return loss

        session.step = timed  # type: ignore[method-assign]
        torch.cuda.reset_peak_memory_stats()
        summary = trainer.run()
        record = {
            "step_s": times, "exchanged": exchanged, "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "summary": summary.headline(),
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
        }
        Path(folder, f"{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def summarise(run: Run, records: list[dict[str, Any]], per_round: int) -> dict[str, Any]:
    """Rank 0's step times as medians per kind of step, and every worker's peak memory."""
    times, exchanged = records[0]["step_s"], records[0]["exchanged"]
    first_round_end = exchanged.index(True)
    steady = list(zip(times, exchanged))[first_round_end + 1 :]
    local = [t for t, ends in steady if not ends]
    round_end = [t for t, ends in steady if ends]
    round_s = statistics.median(sum(times[i : i + per_round]) for i in range(per_round, len(times) - per_round + 1, per_round))
    exchange_s = statistics.median(round_end) - statistics.median(local)
    summary = records[0]["summary"]
    return {
        **asdict(run), "label": run.label, "parameters": records[0]["parameters"],
        "local_step_ms": 1e3 * statistics.median(local), "round_end_step_ms": 1e3 * statistics.median(round_end),
        "round_ms": 1e3 * round_s, "exchange_ms": 1e3 * exchange_s, "exchange_share": exchange_s / round_s,
        "peak_allocated_bytes": max(r["peak_allocated_bytes"] for r in records),
        "peak_reserved_bytes": max(r["peak_reserved_bytes"] for r in records),
        "bytes_per_round": summary["bytes_per_step"] * per_round, "val_loss": summary["val_loss"],
        "replicas_identical": summary["replicas_identical"],
        "digests": sorted({r["summary"]["parameter_digest"] for r in records}),
    }


def measure(run: Run) -> dict[str, Any]:
    """Train ``run`` in its own processes; its row."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(run, free_port(), folder), nprocs=run.workers, join=True)
        records = [json.loads(Path(folder, f"{rank}.json").read_text()) for rank in range(run.workers)]
    row = summarise(run, records, ROUND_STEPS)
    log.info("%s: local step %.1f ms, round %.1f ms, exchange %.1f ms (%.0f%%), peak %s per worker", run.label,
             row["local_step_ms"], row["round_ms"], row["exchange_ms"], 100 * row["exchange_share"],
             common.human_bytes(row["peak_allocated_bytes"]))
    return row


def render_table(results: dict[str, Any], results_file: Path) -> str:
    headers = ["run", "parameters", "local step", f"round ({ROUND_STEPS} steps)", "exchange per round (share)", "peak GPU memory per worker",
               "payload per round", "replicas identical", "val loss"]
    rows = [[
        row["label"], f"{row['parameters'] / 1e6:.1f} M", f"{row['local_step_ms']:.1f} ms", f"{row['round_ms']:.1f} ms",
        f"{row['exchange_ms']:.1f} ms ({100 * row['exchange_share']:.0f}%)",
        f"{common.human_bytes(row['peak_allocated_bytes'])} (reserved {common.human_bytes(row['peak_reserved_bytes'])})",
        common.human_bytes(row["bytes_per_round"]), "yes" if row["replicas_identical"] and len(row["digests"]) == 1 else "NO",
        f"{row['val_loss']:.3f}",
    ] for row in results["rows"]]
    return (
        f"{common.markdown_table(headers, rows)}\n\n"
        f"Measured on one {results['card']} (torch {results['machine']['torch']}, triton {results['triton']}; "
        f"{common.machine_line(results['machine'])}), method {results['method']}, bf16 autocast; the workers of a run share "
        "the one GPU, so a step's time is theirs together. Medians over every round after the first. "
        f"{common.generated_by(results['command'], results_file)}"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    labels = [row["label"] for row in rows]
    local = [row["round_ms"] - row["exchange_ms"] for row in rows]
    ax.barh(labels, local, label="local steps")
    ax.barh(labels, [row["exchange_ms"] for row in rows], left=local, label="exchange at the round's end")
    ax.set_xlabel(f"milliseconds per round of {ROUND_STEPS} steps")
    ax.set_title(f"{results['method']} on one {results['card']}, bf16")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_all(runs: list[Run], out: Path) -> dict[str, Any]:
    """Every run's row, saved to ``out`` after each, so that a cut-short lease keeps what it measured."""
    import triton

    results = {
        "machine": common.machine_description(), "card": torch.cuda.get_device_name(), "triton": triton.__version__,
        "method": DEFAULT_METHOD, "command": shlex.join([Path(sys.executable).name, *sys.argv]), "rows": [],
    }
    for run in runs:
        results["rows"].append(measure(run))
        common.save_results(out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    if not args.render_only and (problem := common.gpu_problem("benchmarks/gpu.py")):
        log.error("%s", problem)
        return 2
    runs = list(RUNS) if args.runs == "all" else [RUNS[int(i)] for i in args.runs.split(",")]
    results = common.run_or_reread(args.render_only, args.out, lambda: measure_all(runs, args.out))
    if results is None:
        return 2
    plot(results, args.plot)
    return 0 if common.publish_table(render_table(results, args.out), MARKER, args.doc, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())
