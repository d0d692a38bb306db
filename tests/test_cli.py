"""The command line: demo, torchrun, config files, and the errors a user sees."""

import json
import os
import subprocess
import sys

import pytest
from distributed import run_workers
from tiny import TINY_FLAGS

from disttrain.comm import CompressedAllReduce
from disttrain.methods import DEFAULT_METHOD, get_method
from disttrain.models import GPT, GPTConfig



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
        "-m", "disttrain.launcher", "--steps", "3", "--eval_every", "3", *TINY_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    assert last_json_line(result.stdout)["workers"] == 2


def test_config_file_sets_fields_and_flags_override_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('steps = 50\nmethod = "seeded-int8-reconstruct"\n[model]\nn_layer = 1\n')
    result = run("disttrain", "train", "--nproc", "1", "--config", str(config), "--steps", "2", *TINY_FLAGS[2:])
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert summary["steps"] == 2 and summary["method"] == "seeded-int8-reconstruct"


def test_unknown_method_is_refused_with_the_known_ones():
    result = run("disttrain", "train", "--nproc", "1", "--method", "magic")
    assert result.returncode == 2
    assert "unknown method 'magic'; choose one of:" in result.stderr and "dense" in result.stderr


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"model": {"layers": 2}}')
    result = run("disttrain", "train", "--nproc", "1", "--config", str(config))
    assert result.returncode == 2
    assert "unknown config key 'layers' for GPTConfig" in result.stderr


def test_missing_corpus_is_named_before_any_worker_starts_training():
    result = run("disttrain", "train", "--nproc", "1", "--data.corpus", "/no/such/corpus.txt")
    assert result.returncode == 2
    assert "corpus '/no/such/corpus.txt' not found" in result.stderr


def test_launcher_outside_torchrun_says_how_to_start_it():
    result = run(sys.executable, "-m", "disttrain.launcher", "--steps", "1")
    assert result.returncode == 2
    assert "RANK" in result.stderr and "torchrun --nproc-per-node" in result.stderr


@pytest.mark.parametrize("command", [["methods"], ["--help"]])
def test_informational_commands_succeed(command):
    result = run("disttrain", *command)
    assert result.returncode == 0
    assert DEFAULT_METHOD in result.stdout or "demo" in result.stdout
