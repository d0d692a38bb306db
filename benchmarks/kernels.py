"""Kernel benchmark (CUDA): the fused Triton kernels against torch, on weight shapes of real models.

For each shape (4096x4096, 4096x11008, 11008x4096; the longer side is the one projected, as the
compressors do) and rank (32, 128, 512) it times:

- seeded projection R = P^T G, G in fp32 and in bf16: fused (P made in registers, never stored),
  generated (P made once by the Triton generator into a transient buffer, then the same kernel
  reads it: what ``kernels.project`` does for bf16), generated + cuBLAS (the generator, then a torch
  matmul) against materialised torch (P built by the torch reference generator, then a matmul) and
  against torch with an explicit P computed beforehand;
- seeded reconstruction out += alpha P R (fp32 out), the same three ways;
- SVD-mode error feedback with an explicit P (fp32): R = P^T (G + e) then e' = (G + e) - P R, two
  fused kernels against torch (add, matmul, addmm);
- int8 quantisation of R, to show what fusing it into the projection could save;
- the default method's hot path on the whole tensor: the chunked top-4 votes of a momentum
  (``kernels.top_votes``) and the mean of 4 workers' votes (``kernels.vote_mean``), Triton
  against the torch reference.

Time is the median of ``triton.testing.do_bench``. GB/s counts the bytes the operation has to
move at the least (G read once, R written once, ...), the same for every implementation, and
% of HBM compares that with --peak-tbps. Extra memory is the peak allocated during one call above
what the call leaves allocated (its result), plus the explicit P an "explicit" row keeps around.

    python benchmarks/kernels.py [--peak-tbps 3.35] [--ranks 32,128,512]
    python benchmarks/kernels.py --render-only   # the table in docs/benchmarks.md from the existing JSON (no GPU needed)
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from disttrain import kernels
from disttrain.kernels import projection, seeded, votes
from disttrain.kernels.basis import SeededMatrix

sys.path.append(str(Path(__file__).resolve().parent))  # `common` also when run via `disttrain bench`
import common  # noqa: E402

log = logging.getLogger("benchmarks.kernels")

MARKER = "kernels-table"
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
RANKS = (32, 128, 512)
H100_SXM_TBPS = 3.35
ALPHA = 1e-3  # small, so that hundreds of repeated in-place adds stay finite
DEVICE = "cuda"
IMPLEMENTATIONS = ("fused", "generated", "generated_cublas", "materialised", "explicit")
VOTE_WORKERS = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--peak-tbps", type=float, default=H100_SXM_TBPS, help="the card's HBM bandwidth in TB/s (H100 SXM: 3.35)"
    )
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated ranks to measure")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "kernels.json")
    parser.add_argument("--doc", type=Path, default=common.DOC, help="the document the table goes into, between its markers")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the table from --out")
    return parser.parse_args(argv)


def milliseconds(fn: Callable[[], Any]) -> float:
    """Median time of one call."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def extra_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes one call allocates beyond what it leaves allocated (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - max(before, torch.cuda.memory_allocated())
    del result
    return extra


def measure(operation: str, shape: tuple[int, int], rank: int, dtype: torch.dtype, moved: int,
            candidates: dict[str, Callable[[], Any]], held: dict[str, int]) -> dict[str, Any]:
    """One result row: time and memory of every implementation of one operation."""
    row: dict[str, Any] = {"operation": operation, "shape": list(shape), "rank": rank,
                           "dtype": str(dtype).removeprefix("torch."), "bytes_moved": moved}
    for name, fn in candidates.items():
        memory = extra_memory(fn)  # also the warm-up: autotuning and cuBLAS workspaces happen here
        row[name] = {"ms": milliseconds(fn), "extra_bytes": memory + held.get(name, 0)}
    log.info("%s %s r=%d %s: %s", operation, shape, rank, row["dtype"],
             ", ".join(f"{name} {row[name]['ms']:.3f} ms" for name in candidates))
    return row


def seeded_rows(shape: tuple[int, int], rank: int, side: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Projection, and (fp32 only) reconstruction, on a seeded basis."""
    m, n = shape
    reduced = kernels.reduced_dim(shape, side)
    length = m + n - reduced
    key = kernels.StreamKey.derive(1, 2, 3)
    basis = SeededMatrix(key, reduced, rank)
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    explicit = seeded.seeded_matrix(key, reduced, rank, device=DEVICE).to(dtype)

    def torch_project(p: torch.Tensor) -> torch.Tensor:
        return (p.t() @ grad if side == "left" else grad @ p).float()

    def materialise() -> torch.Tensor:
        return seeded.seeded_matrix(key, reduced, rank, device=DEVICE).to(dtype)

    def generate() -> torch.Tensor:
        return seeded.seeded_matrix_triton(key, reduced, rank, device=DEVICE)

    size = grad.element_size()
    rows = [measure("seeded project", shape, rank, dtype, m * n * size + rank * length * 4, {
        "fused": lambda: projection.project_in_registers_triton(grad, basis, side),
        "generated": lambda: projection.project_in_registers_triton(grad, generate(), side),
        "generated_cublas": lambda: torch_project(generate().to(dtype)),
        "materialised": lambda: torch_project(materialise()),
        "explicit": lambda: torch_project(explicit),
    }, {"explicit": explicit.numel() * size})]
    if dtype != torch.float32:
        return rows
    out = torch.randn(shape, device=DEVICE)
    coeffs = torch.randn((rank, n) if side == "left" else (m, rank), device=DEVICE)

    def torch_add(p: torch.Tensor) -> torch.Tensor:
        return out.addmm_(p, coeffs, alpha=ALPHA) if side == "left" else out.addmm_(coeffs, p.t(), alpha=ALPHA)

    rows.append(measure("seeded reconstruct_add_", shape, rank, dtype, 2 * m * n * 4 + rank * length * 4, {
        "fused": lambda: kernels.reconstruct_add_(out, coeffs, basis, ALPHA, side),
        "materialised": lambda: torch_add(materialise()),
        "explicit": lambda: torch_add(explicit),
    }, {"explicit": explicit.numel() * 4}))
    rows.append(quantise_row(kernels.project(grad, basis, side), shape, rank, rows[0]["fused"]["ms"]))
    return rows


def quantise_row(coeffs: torch.Tensor, shape: tuple[int, int], rank: int, project_ms: float) -> dict[str, Any]:
    """int8 quantisation of the projection's output, and its cost relative to the projection."""
    row = measure("int8 quantise R", shape, rank, torch.float32, coeffs.numel() * 5,
                  {"fused": lambda: kernels.quantize_rows(coeffs)}, {})
    row["fraction_of_projection"] = row["fused"]["ms"] / project_ms
    return row


def feedback_row(shape: tuple[int, int], rank: int, side: str) -> dict[str, Any]:
    """SVD-mode error feedback: project G + e, then the residual (G + e) - P R."""
    m, n = shape
    reduced = kernels.reduced_dim(shape, side)
    grad, residual = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    basis = torch.linalg.qr(torch.randn(reduced, rank, device=DEVICE)).Q.contiguous()

    def fused() -> torch.Tensor:
        coeffs = kernels.project(grad, basis, side, residual)
        return kernels.feedback_residual(grad, residual, coeffs, basis, side)

    def in_torch() -> torch.Tensor:
        target = grad + residual
        if side == "left":
            return torch.addmm(target, basis, basis.t() @ target, alpha=-1)
        return torch.addmm(target, target @ basis, basis.t(), alpha=-1)

    # G and e read twice (projection, then residual), e' written once.
    return measure("SVD error feedback", shape, rank, torch.float32, 5 * m * n * 4,
                   {"fused": fused, "explicit": in_torch}, {"explicit": basis.numel() * 4})


def vote_rows(shape: tuple[int, int]) -> list[dict[str, Any]]:
    """The default's hot path on one weight: its votes (fp32 momentum), then 4 workers' mean."""
    numel = shape[0] * shape[1]
    grad, momentum = torch.randn(numel, device=DEVICE), torch.randn(numel, device=DEVICE)
    picks = numel // 256 * 4
    encode = {name: (lambda fn=fn: fn(grad, momentum, 0.9, 256, 4)) for name, fn in
              (("fused", votes.top_votes_triton), ("explicit", votes.top_votes_torch))}
    rows = [measure("votes top-4 of 256", shape, 0, torch.float32, numel * 12 + 2 * picks, encode, {})]
    positions, codes, _ = votes.top_votes_triton(grad, momentum, 0.9, 256, 4)
    positions, codes = positions.expand(VOTE_WORKERS, -1, -1), codes.expand(VOTE_WORKERS, -1, -1)
    mean = {name: (lambda fn=fn: fn(positions, codes, 256, numel, VOTE_WORKERS)) for name, fn in
            (("fused", votes.vote_mean_triton), ("explicit", votes.vote_mean_torch))}
    rows.append(measure(f"mean of {VOTE_WORKERS} workers' votes", shape, 0, torch.float32,
                        numel * 4 + VOTE_WORKERS * 2 * picks, mean, {}))
    return rows


def run_all(ranks: list[int], save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Every row, shape by shape and rank by rank; ``save`` gets the rows so far after each shape."""
    rows: list[dict[str, Any]] = []
    for shape in SHAPES:
        rows += vote_rows(shape)
        side = "left" if shape[0] >= shape[1] else "right"
        for rank in ranks:
            for dtype in (torch.float32, torch.bfloat16):
                rows += seeded_rows(shape, rank, side, dtype)
            rows.append(feedback_row(shape, rank, side))
            torch.cuda.empty_cache()
        save(rows)
    return rows


def _speedup(row: dict[str, Any], baseline: str) -> str:
    """How many times faster the fused kernels ran than ``baseline`` ('—' if it was not measured)."""
    return f"{row[baseline]['ms'] / row['fused']['ms']:.1f}x" if baseline in row else "—"


def _extra_memory(row: dict[str, Any], name: str) -> str:
    """The extra memory implementation ``name`` used ('—' if it was not measured)."""
    return common.human_bytes(row[name]["extra_bytes"]) if name in row else "—"


def render_table(results: dict[str, Any], results_file: Path = common.RESULTS_DIR / "kernels.json") -> str:
    """The table (int8 quantisation summarised below it), with a line saying what was measured and how."""
    peak = results["peak_tbps"] * 1e12
    headers = [
        "operation", "shape", "rank", "dtype", "fused", "GB/s (% of HBM)", "generated / + cuBLAS", "materialised torch",
        "explicit-P torch (votes: the torch reference)", "fused speed-up vs materialised / explicit",
        "extra memory: fused / generated / + cuBLAS / materialised / explicit",
    ]
    table_rows = []
    for row in results["rows"]:
        if "fraction_of_projection" in row:
            continue
        rate = row["bytes_moved"] / (row["fused"]["ms"] * 1e-3)
        table_rows.append([
            row["operation"],
            "x".join(map(str, row["shape"])),
            str(row["rank"]) if row["rank"] else "—",
            row["dtype"],
            f"{row['fused']['ms']:.3f} ms",
            f"{rate / 1e9:.0f} ({100 * rate / peak:.0f}%)",
            " / ".join(f"{row[name]['ms']:.3f} ms" if name in row else "—" for name in ("generated", "generated_cublas")),
            *(f"{row[name]['ms']:.3f} ms" if name in row else "—" for name in ("materialised", "explicit")),
            f"{_speedup(row, 'materialised')} / {_speedup(row, 'explicit')}",
            " / ".join(_extra_memory(row, name) for name in IMPLEMENTATIONS),
        ])
    quantise = [row["fraction_of_projection"] for row in results["rows"] if "fraction_of_projection" in row]
    return (
        f"{common.markdown_table(headers, table_rows)}\n\n"
        f"Measured on {results['card']} (torch {results['machine']['torch']}, triton {results['triton']}); "
        f"HBM peak taken as {results['peak_tbps']} TB/s. Times are medians of triton.testing.do_bench; GB/s counts the "
        "bytes each operation must move at the least (the same for every implementation). torch matmuls ran with "
        f"allow_tf32={results['allow_tf32']}; the fused kernels multiply fp32 as tf32x3 and bf16 in bf16. "
        f"Quantising R to int8 (a separate kernel) takes {100 * min(quantise):.0f}-{100 * max(quantise):.0f}% of the "
        f"fp32 seeded projection's time. {common.generated_by(results['command'], results_file)}"
    )


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    if args.render_only:
        results = common.read_results(args.out)
        if results is None:
            return 2
        return 0 if common.publish_table(render_table(results, args.out), MARKER, args.doc, args.out.parent) else 1
    problem = common.gpu_problem("benchmarks/kernels.py")
    if problem:
        log.error("%s", problem)
        return 2
    import triton

    results = {
        "machine": common.machine_description(),
        "card": torch.cuda.get_device_name(),
        "triton": triton.__version__,
        "peak_tbps": args.peak_tbps,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }

    def save(rows: list[dict[str, Any]]) -> None:
        common.save_results(args.out, {**results, "rows": rows})

    results["rows"] = run_all([int(rank) for rank in args.ranks.split(",")], save)
    return 0 if common.publish_table(render_table(results, args.out), MARKER, args.doc, args.out.parent) else 1


if __name__ == "__main__":
    sys.exit(main())
