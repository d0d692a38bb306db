"""The command line: demo, torchrun, config files, and the errors a user sees."""

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed import run_workers
from tiny import TINY_FLAGS

from pathlib import Path

from disttrain import cli
from disttrain.comm import CompressedAllReduce
from disttrain.methods import DEFAULT_METHOD, get_method
from disttrain.models import GPT, GPTConfig


REPO = Path(__file__).resolve().parent.parent


def run(*command: str, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})})


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_demo_trains_several_workers_and_prints_one_json_summary():
    result = run("disttrain", "demo", "--workers", "2", "--steps", "4")
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert {"workers", "steps", "method", "val_loss", "bytes_per_step", "dense_bytes_per_step"} <= summary.keys()
    assert summary["workers"] == 2 and summary["steps"] == 4 and summary["method"] == DEFAULT_METHOD
    assert summary["replicas_identical"] is True
    assert "2 workers on localhost" in result.stderr


def steady_state_ratio(rank: int, world: int) -> float:
    model = GPT(GPTConfig())
    method = get_method(DEFAULT_METHOD)
    reducer = CompressedAllReduce(model.parameters(), method.compression, seed=0)
    basis_bytes = sum(c.basis_numel() * 4 for c in reducer.compressors)
    per_exchange = reducer.compressed_payload_bytes() + basis_bytes / method.compression.refresh_every
    return reducer.dense_bytes_per_step * method.local_steps / per_exchange


def test_demo_method_sends_at_least_150x_fewer_bytes_than_dense_on_the_default_model():
    assert run_workers(steady_state_ratio, 1)[0] >= 150


def test_torchrun_starts_workers_with_the_launcher_module():
    result = run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "disttrain.launcher", "--steps", "3", "--eval-every", "3", *TINY_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    assert last_json_line(result.stdout)["workers"] == 2


@pytest.mark.parametrize("inner", [pytest.param("auto", marks=pytest.mark.slow), "fsdp"])
def test_train_runs_emulated_nodes_of_several_processes_as_one_worker_each(inner):
    result = run(
        "disttrain", "train", "--nproc", "4", "--nproc-per-node", "2", "--inner", inner, "--steps", "5", "--eval-every", "5",
        *TINY_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert (summary["workers"], summary["processes_per_worker"]) == (2, 2)
    assert summary["replicas_identical"] is True
    assert "2 nodes x 2 processes" in result.stderr


def test_config_file_sets_fields_and_flags_override_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('steps = 50\nmethod = "seeded-int8-reconstruct"\n[model]\nn_layer = 1\n')
    result = run("disttrain", "train", "--nproc", "1", "--config", str(config), "--steps", "2", *TINY_FLAGS[2:], "--rank", "4")
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert summary["steps"] == 2 and summary["method"] == "seeded-int8-reconstruct"


def test_launcher_outside_torchrun_says_how_to_start_it():
    result = run(sys.executable, "-m", "disttrain.launcher", "--steps", "1")
    assert result.returncode == 2
    assert "RANK" in result.stderr and "torchrun --nproc-per-node" in result.stderr


@pytest.mark.parametrize("command", [["methods"], ["--help"], ["train", "--help"], ["demo", "--help"], ["coordinator", "--help"]])
def test_informational_commands_succeed(command):
    result = run("disttrain", *command)
    assert result.returncode == 0
    assert DEFAULT_METHOD in result.stdout or "demo" in result.stdout or "--" in result.stdout


BAD_INPUTS = {
    "no workers": (["train", "--nproc", "0"], "argument --nproc: must be > 0, got 0"),
    "no demo workers": (["demo", "--workers", "0"], "argument --workers: must be > 0, got 0"),
    "unknown method": (["train", "--method", "diloco-sparse-k4"], "did you mean 'diloco-sparse-k4-h5'"),
    "unknown demo method": (["demo", "--method", "magic"], "unknown method 'magic'"),
    "rank for a method without one": (["train", "--rank", "100000"], "--rank does not apply to 'diloco-sparse-k4-h5'"),
    "rank too large": (["train", "--method", "svd-int8-reconstruct", "--rank", "100000"], "choose a rank below 256"),
    "not a number": (["train", "--model.n_layer", "abc"], "argument --model.n-layer: invalid int value: 'abc'"),
    "zero link rate": (["train", "--link-mbit", "0"], "--link-mbit is a rate in Mbit/s and must be > 0"),
    "not a boolean": (["train", "--overlap", "maybe"], "expected true or false, got 'maybe'"),
    "unknown choice": (["train", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    "nccl for CPU training": (["train", "--device", "cpu", "--backend", "nccl"], "--backend nccl moves CUDA tensors only"),
    "unknown flag": (["train", "--no-such-flag", "1"], "unrecognised arguments: --no-such-flag 1"),
    "malformed address": (["train", "--coordinator", "localhost:29400"], "use tcp://HOST:PORT"),
    "missing corpus": (["train", "--data.corpus", "/no/such/corpus.txt"], "corpus '/no/such/corpus.txt' not found"),
    "missing config file": (["train", "--config", "/no/such/run.toml"], "config file '/no/such/run.toml' not found"),
    "nodes of one process": (["train", "--nproc", "2", "--inner", "ddp"], "add --nproc-per-node G (G > 1)"),
    "no whole nodes": (["train", "--nproc", "3", "--nproc-per-node", "2"], "--nproc 3 is not a whole number of nodes"),
    "nodes with a per-step method": (
        ["train", "--nproc", "4", "--nproc-per-node", "2", "--inner", "ddp", "--method", "power-int4-r16"],
        "pick a diloco-* or fedavg-* method without overlap, or --inner flat",
    ),
    "nodes with a per-worker subspace": (
        ["train", "--nproc", "4", "--nproc-per-node", "2", "--inner", "ddp", "--method", "fedavg-subspace-int8-h10"],
        "keeps moments in a per-worker subspace, which a node's processes cannot share",
    ),
    "LoRA on a projected method": (
        ["train", "--mode", "federated", "--method", "fedavg-subspace-int8-h10", "--lora.rank", "8"],
        "pick a method without a projected optimizer",
    ),
    "LoRA head the GPT lacks": (["train", "--lora.rank", "4"], "lora.train-whole auto: the model has none of the usual head modules"),
    "LoRA head named but missing": (["train", "--lora.rank", "4", "--lora.train-whole", "classifier"], "lora.train-whole names modules the model does not have"),
    "votes per chunk on a projection": (["train", "--method", "power-int4-r16", "--votes-per-chunk", "8"], "is not sparse votes"),
    "more votes than a chunk holds": (["train", "--votes-per-chunk", "300"], "must be <= 256"),
    "outer lr on a per-step method": (["train", "--method", "power-int4-r16", "--outer-lr", "0.1"], "has no rounds"),
    "sharded nodes under a coordinator": (
        ["train", "--inner", "fsdp", "--coordinator", "tcp://127.0.0.1:29400"], "FSDP2 binds its shards to one process group",
    ),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_once_before_any_worker_starts(capsys, monkeypatch):
    assert "torch sees no CUDA GPU: use --device cpu" in cli_error(["train", "--nproc", "4", "--device", "cuda"], capsys, monkeypatch)


def cli_error(argv: list[str], capsys, monkeypatch) -> str:
    """What `disttrain ARGV` prints on stderr, in this process, asserting exit status 2 and that
    nothing (no coordinator, no worker) was started."""
    def spawned(*_, **__):
        raise AssertionError("a process was started before the input was checked")

    monkeypatch.setattr(cli, "launch_local", spawned)
    monkeypatch.setattr(cli, "setup_logging", lambda tag: None)  # the test process keeps its own logging
    monkeypatch.setenv("DISTTRAIN_SECRET", "0" * 64)  # the demo would set one for the rest of the session
    monkeypatch.setattr(cli.Coordinator, "serve", spawned)
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize("argv, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_exit_2_before_any_process_starts(argv, message, capsys, monkeypatch):
    error = cli_error(argv, capsys, monkeypatch)
    assert error.count("\n") == 1 and message in error, error


def test_a_bad_command_line_gives_no_traceback_from_the_real_command():
    result = run("disttrain", "train", "--method", "diloco-sparse-k4", "--nproc", "2")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "did you mean 'diloco-sparse-k4-h5'" in result.stderr


CONFIG_FILES = {
    "malformed TOML": ("run.toml", 'steps = 5\nmethod = "dense\n', "'run.toml' is not valid TOML: Illegal character"),
    "malformed JSON": ("run.json", '{"steps": 3,}', "'run.json' is not valid JSON: Expecting property name"),
    "unknown format": ("run.yaml", "steps: 3", "unknown format '.yaml'; use a .toml or .json file"),
    "unknown key": ("run.json", '{"model": {"layers": 2}}', "unknown config key 'model.layers' for GPTConfig"),
    "wrong type": ("run.toml", 'steps = "abc"\n', "steps must be int, got 'abc' (in run.toml)"),
    "unknown value": ("run.toml", 'precision = "fp8"\n', "precision must be one of fp32, bf16, got 'fp8' (in run.toml)"),
}


@pytest.mark.parametrize("name, text, message", CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_bad_config_file_is_named_with_its_problem(tmp_path, name, text, message, capsys, monkeypatch):
    (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    error = cli_error(["train", "--config", name], capsys, monkeypatch)
    assert error.count("\n") == 1 and message in error, error


def test_example_config_trains():
    result = run("disttrain", "train", "--nproc", "1", "--config", str(REPO / "examples" / "run.toml"), "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert last_json_line(result.stdout)["method"] == "diloco-sparse-k4-h5"
