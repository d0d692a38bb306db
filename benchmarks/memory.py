"""Memory benchmark: optimizer-state bytes of each disttrain method against torch AdamW.

Each row builds the default small GPT, runs one real optimizer step in a 1-process Gloo group
(wired as training wires it), then counts the tensors the optimizer and the gradient exchange
keep between steps: Adam moments (full size for AdamW, r x n for ProjectedAdamW), SVD bases
(P, m x r per matrix; seeded bases store nothing) and error-feedback residuals (full size).

    python benchmarks/memory.py
    python benchmarks/memory.py --render-only   # the table in docs/benchmarks.md from the existing JSON
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import CompressedAllReduce
from disttrain.data.corpus import ByteCorpus
from disttrain.launcher.local import free_port
from disttrain.methods import METHODS
from disttrain.models.gpt import GPT
from disttrain.optim import optimizer_state_bytes
from disttrain.train.config import TrainConfig
from disttrain.session import Session
from disttrain.train.forward import forward_loss
from disttrain.train.optimizer import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
import common  # noqa: E402

log = logging.getLogger("benchmarks.memory")

MARKER = "memory-table"
Batch = tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "memory.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table from --out")
    return parser.parse_args(argv)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A world of one Gloo process, so the real exchange code path runs."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fresh_model(config: TrainConfig) -> GPT:
    """The model every row starts from (same seed, so same weights)."""
    torch.manual_seed(config.seed)
    return GPT(config.model)


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the tensors among ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def residual_bytes(reducer: CompressedAllReduce) -> int:
    """Bytes of the error-feedback residuals the exchange keeps."""
    return sum(
        tensor_bytes(value for key, value in compressor.state_dict().items() if key.rsplit(".", 1)[-1] == "residual")
        for compressor in reducer.compressors
    )


def row(method: str, summary: str, optimizer: str, optimizer_bytes: int, basis: int, residual: int) -> dict[str, Any]:
    """One result row; ``vs_adamw`` is filled in once the AdamW row is known."""
    return {
        "method": method,
        "summary": summary,
        "optimizer": optimizer,
        "optimizer_state_bytes": optimizer_bytes,
        "basis_bytes": basis,
        "residual_bytes": residual,
        "total_bytes": optimizer_bytes + basis + residual,
    }


def adamw_row(config: TrainConfig, batch: Batch) -> dict[str, Any]:
    """torch AdamW on the uncompressed model after one step."""
    model = fresh_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.peak_lr, betas=(config.optim.beta1, config.optim.beta2))
    _, loss = model(*batch)
    loss.backward()
    optimizer.step()
    return row("torch AdamW", "torch.optim.AdamW, no exchange (reference)", "torch AdamW", optimizer_state_bytes(optimizer), 0, 0)


def method_row(name: str, batch: Batch) -> dict[str, Any]:
    """A registry method after one step through the Session, as `disttrain train` runs it."""
    config = TrainConfig(method=name)
    method = METHODS[name]
    model = fresh_model(config)
    session = Session(model, build_optimizer(model.parameters(), method, config), method, seed=config.seed)
    session.step(lambda: forward_loss(model, batch, config.precision))
    reducer = session.exchange.reducer
    exchange = reducer.state_bytes()
    residual = residual_bytes(reducer)
    optimizer = "ProjectedAdamW" if method.optimizer == "projected_adamw" else "torch AdamW"
    return row(name, method.summary, optimizer, optimizer_state_bytes(session.optimizer), exchange - residual, residual)


def measure() -> tuple[list[dict[str, Any]], int]:
    """All rows (AdamW first) and the model's parameter count."""
    config = TrainConfig()
    batch = ByteCorpus(config.data, config.seed).train_batch(0, 0, 1)
    names = [name for name, method in METHODS.items() if method.engine == "disttrain"]
    with single_process_group():
        rows = [adamw_row(config, batch)] + [method_row(name, batch) for name in names]
    baseline = rows[0]["total_bytes"]
    for entry in rows:
        entry["vs_adamw"] = entry["total_bytes"] / baseline
        log.info("%s: %s", entry["method"], common.human_bytes(entry["total_bytes"]))
    return rows, sum(p.numel() for p in fresh_model(config).parameters())


def method_note(parameters: int) -> str:
    """What is counted, in one sentence."""
    return (
        f"default GPTConfig ({parameters / 1e6:.2f} M parameters, {common.human_bytes(4 * parameters)} of fp32 weights), "
        "one real optimizer step in a single process; counted: tensors in optimizer.state (Adam moments and step "
        "counters) plus the exchange's persistent state (SVD bases P, error-feedback residuals); not counted: "
        "weights, gradients, transient buffers"
    )


def render_table(results: dict[str, Any], results_file: Path = common.RESULTS_DIR / "memory.json") -> str:
    """The table, with a line saying what is counted and one saying how it was made."""
    headers = ["method", "optimizer", "optimizer state", "bases", "EF residuals", "total", "vs AdamW"]
    rows = [
        [
            entry["method"],
            entry["optimizer"],
            common.human_bytes(entry["optimizer_state_bytes"]),
            common.human_bytes(entry["basis_bytes"]),
            common.human_bytes(entry["residual_bytes"]),
            common.human_bytes(entry["total_bytes"]),
            f"{entry['vs_adamw']:.2f}x",
        ]
        for entry in results["rows"]
    ]
    return (
        f"{common.markdown_table(headers, rows)}\n\n"
        f"Measured on {common.machine_line(results['machine'])}: {results['method_note']}. "
        f"{common.generated_by(results['command'], results_file)}"
    )


def run_all() -> dict[str, Any]:
    """Measure every row; the results document."""
    rows, parameters = measure()
    return {
        "machine": common.machine_description(),
        "method_note": method_note(parameters),
        "parameters": parameters,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    results = common.run_or_reread(args.render_only, args.out, run_all)
    if results is None:
        return 2
    return 0 if common.publish_table(render_table(results, args.out), MARKER, args.doc, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())
