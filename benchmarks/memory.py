"""Memory benchmark: the state each method keeps between steps, against torch AdamW and galore-torch.

Each row runs in a fresh process: it builds the scale study's 19 M-parameter GPT (``--model``), trains it for two rounds (two
steps for a per-step method) in a one-process Gloo group, wired as `disttrain train` wires it, and
counts the tensors kept between steps: the optimizer's (Adam moments, in the subspace for
ProjectedAdamW and GaLore, bf16 and factored for LeanAdamW), the exchange's (bases, error-feedback
residuals, vote momentum and the votes a chunk owner keeps) and the rounds' (the round's starting weights, a second copy under
overlap, the outer optimizer's momentum). The process's peak RSS is recorded too: what the counted
tensors leave out (weights, gradients, activations, transient buffers, torch itself) is in it.

    python benchmarks/memory.py
    python benchmarks/memory.py --render-only   # the table in docs/benchmarks.md from the existing JSON
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import logging
import multiprocessing
import resource
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from disttrain.comm.layout import tensors_bytes
from disttrain.compress import CompressionSpec
from disttrain.data.corpus import ByteCorpus
from disttrain.exchange.local_rounds import LocalRoundsExchange
from disttrain.launcher.local import free_port
from disttrain.method_listing import RECOMMENDED
from disttrain.methods import METHODS, get_method
from disttrain.models.gpt import GPT
from disttrain.optim import optimizer_state_bytes
from disttrain.session import Session
from disttrain.train.config import TrainConfig
from disttrain.train.forward import forward_loss
from disttrain.train.optimizer import build_optimizer

sys.path.append(str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
import common  # noqa: E402

log = logging.getLogger("benchmarks.memory")

MARKER = "memory-table"
LEAN_METHODS = ("diloco-sparse-k4-h5-lean", "diloco-sparse-k4-h5-lean-bf16-start")
STUDY_METHODS = (
    "diloco-sparse-k4-h5-overlap", "diloco-owners-k4-keep16-h5", "dense", "svd-projected", "svd-reconstruct",
    "svd-int8-reconstruct", "seeded-projected", "seeded-reconstruct", "seeded-int8-projected", "seeded-int8-reconstruct",
)
GALORE = "galore-torch GaLoreAdamW"
GALORE_INSTALL = 'pip install -e ".[bench]" (or pip install galore-torch)'
ROUNDS = 2  # rounds (steps, for a per-step method) trained before counting
Batch = tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "memory.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table from --out")
    parser.add_argument("--model", choices=common.MODEL_SIZES, default="gpt-19m", help="the GPT every row trains")
    return parser.parse_args(argv)


def measured_methods() -> list[str]:
    """The recommended methods first, the lean ones, then the study's others."""
    return list(dict.fromkeys([*RECOMMENDED, *LEAN_METHODS, *STUDY_METHODS]))


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


def batches(config: TrainConfig, steps: int) -> Iterator[Batch]:
    corpus = ByteCorpus(config.data, config.seed)
    return (corpus.train_batch(step, 0, 1) for step in range(steps))


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def row(method: str, summary: str, optimizer: str, **parts: int) -> dict[str, Any]:
    """One result row: the counted parts, their total and the process's peak RSS; ``vs_adamw`` comes later."""
    counted = {f"{name}_bytes": value for name, value in parts.items()}
    total = sum(parts.values())
    return {"method": method, "summary": summary, "optimizer": optimizer, **counted, "total_bytes": total, "peak_rss_bytes": peak_rss_bytes()}


def train_plainly(config: TrainConfig, optimizer_for: Callable[[GPT], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """ROUNDS steps of an uncompressed model under ``optimizer_for(model)``; the optimizer."""
    model = fresh_model(config)
    optimizer = optimizer_for(model)
    for batch in batches(config, ROUNDS):
        _, loss = model(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def adamw_row(config: TrainConfig) -> dict[str, Any]:
    """torch AdamW on the uncompressed model (the reference)."""
    betas = (config.optim.beta1, config.optim.beta2)
    optimizer = train_plainly(config, lambda model: torch.optim.AdamW(model.parameters(), lr=config.peak_lr, betas=betas))
    return row("torch AdamW", "torch.optim.AdamW, no exchange (reference)", "torch AdamW", optimizer_state=optimizer_state_bytes(optimizer))


def galore_row(config: TrainConfig) -> dict[str, Any]:
    """PyPI galore-torch's GaLoreAdamW at svd-projected's rank and refresh, on the matrices svd-projected projects."""
    from galore_torch import GaLoreAdamW

    spec: CompressionSpec = get_method("svd-projected").compression

    def galore(model: GPT) -> torch.optim.Optimizer:
        projected = [p for p in model.parameters() if spec.compresses(p.shape)]
        chosen = {id(p) for p in projected}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in chosen]},
            {"params": projected, "rank": spec.rank, "update_proj_gap": spec.refresh_every, "scale": 0.25, "proj_type": "std"},
        ]
        return GaLoreAdamW(groups, lr=config.peak_lr, betas=(config.optim.beta1, config.optim.beta2))

    optimizer = train_plainly(config, galore)
    states = list(optimizer.state.values())
    bases = tensors_bytes([state["projector"].ortho_matrix for state in states if "projector" in state])
    moments = tensors_bytes([{k: v for k, v in state.items() if k != "projector"} for state in states])
    summary = f"GaLore as published (PyPI galore-torch 1.0): SVD basis r={spec.rank} every {spec.refresh_every} steps, no exchange"
    return row(GALORE, summary, "GaLoreAdamW", optimizer_state=moments, bases=bases)


def round_state_bytes(session: Session) -> int:
    """The rounds' own state: the round's start (and this worker's own start under overlap) and the outer momentum."""
    exchange = session.exchange
    if not isinstance(exchange, LocalRoundsExchange):
        return 0
    outer = exchange.outer
    own_start = outer.round_start if outer.round_start is not outer.global_params else []
    return tensors_bytes([outer.global_params, own_start, list(outer.outer.state.values())])


def method_row(name: str, config: TrainConfig) -> dict[str, Any]:
    """A registry method trained for ROUNDS rounds through the Session, as `disttrain train` runs it."""
    method = METHODS[name]
    config = TrainConfig(method=name, model=config.model, data=config.data)
    model = fresh_model(config)
    session = Session(model, build_optimizer(model.parameters(), method, config), method, seed=config.seed)
    for batch in batches(config, ROUNDS * method.local_steps):
        session.step(lambda batch=batch: forward_loss(model, batch, config.precision))
    reducer = session.exchange.reducer
    kept = [(key.rsplit(".", 1)[-1], value) for compressor in reducer.compressors for key, value in compressor.state_dict().items()]
    residuals = tensors_bytes([value for key, value in kept if key == "residual"])
    bases = tensors_bytes([value for key, value in kept if key not in ("residual", "momentum")])
    return row(
        name, method.summary, type(session.optimizer).__name__, optimizer_state=optimizer_state_bytes(session.optimizer),
        bases=bases, residuals=residuals, vote_state=reducer.state_bytes() - bases - residuals,
        round_state=round_state_bytes(session),
    )


def measure_in_this_process(name: str, model: str) -> dict[str, Any]:
    """One row, measured in the calling process (a fresh one: its peak RSS is the row's)."""
    config = TrainConfig(model=common.MODEL_SIZES[model])
    with single_process_group():
        if name == "torch AdamW":
            return adamw_row(config)
        if name == GALORE:
            return galore_row(config)
        return method_row(name, config)


def measure_in_fresh_process(name: str, model: str) -> dict[str, Any]:
    """One row in a process of its own, so that no row's peak RSS includes another's."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_in_this_process, name, model).result()


def measure(model: str) -> tuple[list[dict[str, Any]], int]:
    """All rows (AdamW first) and the model's parameter count."""
    names = ["torch AdamW", GALORE, *measured_methods()]
    with logging_redirect_tqdm():
        rows = [measure_in_fresh_process(name, model) for name in tqdm(names, desc="rows", unit="row")]
    baseline = rows[0]
    for entry in rows:
        for counted in ("total_bytes", "peak_rss_bytes"):
            entry[counted.replace("bytes", "vs_adamw")] = entry[counted] / baseline[counted]
        entry["peak_rss_over_adamw_bytes"] = entry["peak_rss_bytes"] - baseline["peak_rss_bytes"]
        log.info("%s: %s counted, peak RSS %s", entry["method"], common.human_bytes(entry["total_bytes"]), common.human_bytes(entry["peak_rss_bytes"]))
    return rows, GPT(common.MODEL_SIZES[model]).num_parameters()


def method_note(model: str, parameters: int) -> str:
    """What is counted, in one sentence."""
    return (
        f"the {model} GPT ({parameters / 1e6:.2f} M parameters, {common.human_bytes(4 * parameters)} of fp32 weights), "
        f"{ROUNDS} rounds (per-step methods: {ROUNDS} steps) in a single process, each row in a fresh one; counted: tensors in "
        "optimizer.state (Adam moments and step counters; GaLore's and ProjectedAdamW's in the subspace, LeanAdamW's bf16 and "
        "factored), the exchange's persistent state (bases, error-feedback residuals, vote state: a worker's vote momentum "
        "and the votes a chunk owner keeps) and the rounds' state "
        "(round start, the worker's own start under overlap, outer momentum); not counted: weights, gradients, transient "
        "buffers (peak RSS holds them, and torch itself)"
    )


def render_table(results: dict[str, Any], results_file: Path = common.RESULTS_DIR / "memory.json") -> str:
    """The table, with a line saying what is counted and one saying how it was made."""
    headers = [
        "method", "optimizer", "optimizer state", "bases", "EF residuals", "vote state", "round state",
        "total", "vs AdamW", "peak RSS", "peak RSS - AdamW's",
    ]
    parts = ("optimizer_state_bytes", "bases_bytes", "residuals_bytes", "vote_state_bytes", "round_state_bytes")
    rows = [
        [
            entry["method"],
            entry["optimizer"],
            *(common.human_bytes(entry.get(part, 0)) for part in parts),
            common.human_bytes(entry["total_bytes"]),
            f"{entry['total_vs_adamw']:.2f}x",
            common.human_bytes(entry["peak_rss_bytes"]),
            common.human_bytes(entry["peak_rss_over_adamw_bytes"]),
        ]
        for entry in results["rows"]
    ]
    return (
        f"{common.markdown_table(headers, rows)}\n\n"
        f"Measured on {common.machine_line(results['machine'])}: {results['method_note']}. "
        f"{common.generated_by(results['command'], results_file)}"
    )


def run_all(model: str) -> dict[str, Any]:
    """Measure every row; the results document."""
    rows, parameters = measure(model)
    return {
        "machine": common.machine_description(),
        "model": model,
        "method_note": method_note(model, parameters),
        "parameters": parameters,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }


def galore_missing() -> bool:
    """Whether galore-torch cannot be imported (said once, with the install line)."""
    try:
        import galore_torch  # noqa: F401
    except ImportError as error:
        log.error("the GaLore row needs PyPI galore-torch (%s): %s", error, GALORE_INSTALL)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    if not args.render_only and galore_missing():
        return 2
    results = common.run_or_reread(args.render_only, args.out, lambda: run_all(args.model))
    if results is None:
        return 2
    return 0 if common.publish_table(render_table(results, args.out), MARKER, args.doc, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())
