"""Pieces every benchmark shares: atomic writes, the machine description, the tables in docs/benchmarks.md."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from disttrain.models.gpt import GPTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DOC = REPO_ROOT / "docs" / "benchmarks.md"  # where every generated table goes (--doc)


class MarkersMissing(RuntimeError):
    """A document lacks the start/end markers a generated table goes between."""


# The bundled GPT and the scale study's (6 layers x 512, as the study's issue proposed): same corpus and tokenizer.
MODEL_SIZES = {"gpt-3m": GPTConfig(), "gpt-19m": GPTConfig(n_layer=6, n_head=8, n_embd=512)}
DEFAULT_MODEL = "gpt-3m"


def model_flags(name: str) -> list[str]:
    """Worker flags that build the model ``name`` of MODEL_SIZES (none for the default)."""
    if name == DEFAULT_MODEL:
        return []
    config, default = MODEL_SIZES[name], GPTConfig()
    changed = [field.name for field in dataclasses.fields(GPTConfig) if getattr(config, field.name) != getattr(default, field.name)]
    return [word for field in changed for word in (f"--model.{field.replace('_', '-')}", str(getattr(config, field)))]


def setup_logging() -> None:
    """Timestamped INFO logging on stderr (a no-op if logging is already configured)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def gpu_problem(script: str) -> str | None:
    """Why ``script`` cannot measure here (no CUDA GPU, or no triton), or None when it can."""
    if not torch.cuda.is_available():
        return f"{script} needs a CUDA GPU, and torch.cuda.is_available() is False: nothing measured"
    try:
        import triton  # noqa: F401
    except ImportError:
        return f"{script} needs triton: pip install 'disttrain[gpu]'"
    return None


def machine_line(machine: dict[str, Any]) -> str:
    """One short phrase naming the machine, for captions."""
    return f"{machine['cores']}-core {machine['cpu']} CPU, torch {machine['torch']}"


def human_bytes(count: float | None) -> str:
    """Decimal units (kB = 1000 B), three significant digits; '—' for None."""
    if count is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; every cell is already a string."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _markers(marker_name: str) -> tuple[str, str]:
    return f"<!-- {marker_name}:start -->", f"<!-- {marker_name}:end -->"


def update_document(path: Path, marker_name: str, table: str) -> None:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``path``."""
    start, end = _markers(marker_name)
    how = f"add the lines `{start}` and `{end}` where the table belongs"
    if not path.is_file():
        raise MarkersMissing(f"{path} does not exist: create it and {how}")
    text = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise MarkersMissing(f"{path} has no {start} ... {end} markers: {how}")
    write_text_atomic(path, pattern.sub(lambda _: f"{start}\n{table}\n{end}", text, count=1))


def read_results(path: Path) -> dict[str, Any] | None:
    """The results document to re-render, or None (and an error saying what to do) when there is none."""
    if not path.is_file():
        logging.getLogger(__name__).error("no results at %s to render: run without --render-only first", path)
        return None
    return json.loads(path.read_text())


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write a benchmark's results document atomically and say where."""
    write_json_atomic(path, results)
    logging.getLogger(__name__).info("results written to %s", path)


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two machine descriptions name the same hardware and software; the OS kernel's build
    (which the hosts of this shared machine change) does not count."""
    return {k: v for k, v in a.items() if k != "os"} == {k: v for k, v in b.items() if k != "os"}


def earlier_results(path: Path, settings: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any] | None:
    """The results file at ``path`` if it was measured with ``settings`` on ``machine`` (to merge into), else None."""
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())
    if earlier.get("settings") != settings or not same_machine(earlier.get("machine", {}), machine):
        logging.getLogger(__name__).info("%s was measured with other settings or on another machine: not merging it", path)
        return None
    return earlier


def run_or_reread(render_only: bool, path: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """With ``render_only`` the results saved at ``path`` (None if there are none); otherwise
    ``run()``'s fresh results, saved there first."""
    if render_only:
        return read_results(path)
    results = run()
    save_results(path, results)
    return results


def publish_table(table: str, marker_name: str, document: Path = DOC, out_dir: Path = RESULTS_DIR) -> bool:
    """Save ``table`` as <out_dir>/<marker_name>.md and put it into ``document`` between its
    markers; False if the document lacks them."""
    copy = out_dir / f"{marker_name}.md"
    write_text_atomic(copy, table + "\n")
    try:
        update_document(document, marker_name, table)
    except MarkersMissing as error:
        logging.getLogger(__name__).error("%s not updated: %s (the table is in %s)", document, error, copy)
        return False
    logging.getLogger(__name__).info("updated the %s table in %s", marker_name, document)
    return True


# Where a benchmark writes, not how it measured (--readme, --docs: the names these flags had before).
OUTPUT_FLAGS = ("--out", "--doc", "--study-doc", "--readme", "--docs")


def measuring_command(command: str) -> str:
    """``command`` without the flags that only say where its results were written."""
    words, kept = shlex.split(command), []
    skip_value = False
    for word in words:
        if skip_value:
            skip_value = False
        elif word in OUTPUT_FLAGS:
            skip_value = True
        elif not word.startswith(tuple(f"{flag}=" for flag in OUTPUT_FLAGS)):
            kept.append(word)
    return shlex.join(kept)


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def generated_by(command: str, results_file: Path, runs: int | None = None) -> str:
    """The one line under a table: the command that makes it and where its results are kept.

    ``runs``: a table merged from that many runs, whose own commands are in the results file.
    """
    where = shown_path(results_file)
    if runs is None:
        return f"Generated by `{measuring_command(command)}` (results in {where})."
    return f"Generated by `{measuring_command(command)}` ({runs} runs; every run's command is in {where})."
