"""Training across real worker processes: replicas stay identical, and bad setups are named."""

import pytest
import torch
from distributed import run_workers
from tiny import tiny_config

from disttrain.train.replica import check_replicas, parameter_digest
from disttrain.train.trainer import ConfigMismatch, Trainer


def train_and_digest(rank: int, world: int, overrides: dict) -> dict:
    trainer = Trainer(tiny_config(**overrides), progress=False)
    summary = trainer.run()
    return {"digest": parameter_digest(trainer.model), "summary": summary}


@pytest.mark.parametrize(
    "method", ["svd-int8-reconstruct", "seeded-projected", "seeded-int8-reconstruct", "dense", "ddp-hook"]
)
def test_workers_hold_bit_identical_parameters_after_training(method):
    results = run_workers(train_and_digest, 3, {"method": method, "steps": 6, "digest_every": 100})
    assert len({r["digest"] for r in results}) == 1
    assert all(r["summary"].replicas_identical for r in results)


@pytest.mark.parametrize("method", ["svd-int8-reconstruct", "ddp-hook", "powersgd-r4"])
def test_validation_loss_falls(method):
    summary = run_workers(train_and_digest, 2, {"method": method, "steps": 12, "eval_every": 3})[0]["summary"]
    assert summary.history[-1].val_loss < summary.history[0].val_loss - 0.2


def test_compressed_method_sends_over_100x_fewer_bytes_than_dense_on_the_tiny_model():
    summary = run_workers(train_and_digest, 2, {"method": "seeded-int8-reconstruct", "steps": 2})[0]["summary"]
    assert summary.dense_bytes_per_step / summary.bytes_per_step > 10
    assert summary.bytes_per_step > 0


@pytest.mark.parametrize(
    ("overrides", "wire_per_payload"),
    [({"method": "dense"}, 4 / 3), ({"method": "powersgd-r4"}, 4 / 3), ({"method": "diloco-int1-h40", "local_steps": 2}, 2)],
)
def test_wire_bytes_count_what_the_collective_moves(overrides, wire_per_payload):
    # 3 workers: a ring all_reduce moves 2(W-1)/W of the payload, an all_gather receives W-1 payloads
    summary = run_workers(train_and_digest, 3, {**overrides, "steps": 4, "eval_every": 100})[0]["summary"]
    assert summary.wire_bytes_per_step == pytest.approx(wire_per_payload * summary.bytes_per_step, rel=1e-5)


def perturb_and_check(rank: int, world: int) -> tuple[bool, bytes]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    if rank == 1:
        with torch.no_grad():
            model.weight[0, 0] += 1e-3
    identical = check_replicas(model, step=7)
    return identical, parameter_digest(model)


def test_a_diverged_replica_is_detected_and_repaired_from_rank_0():
    results = run_workers(perturb_and_check, 3)
    assert [identical for identical, _ in results] == [False, False, False]
    assert len({digest for _, digest in results}) == 1


def mismatched_config(rank: int, world: int) -> str:
    try:
        Trainer(tiny_config(steps=8 + rank), progress=False)
    except ConfigMismatch as error:
        return str(error)
    return "no error"


def test_workers_started_with_different_configs_are_refused_by_field():
    messages = run_workers(mismatched_config, 2)
    assert all("different configs" in m and "steps (8 vs 9)" in m for m in messages)


def interrupted_and_resumed(
    rank: int, world: int, directory: str, overrides: dict | None = None, checkpoint_every: int = 2, stop_at: int = 5
) -> tuple[bytes, bytes, int]:
    """Digests of a straight run and of one that "crashes" after ``stop_at`` and resumes, and where it resumed."""
    run = {"steps": 8, **(overrides or {})}
    straight = Trainer(tiny_config(**run), progress=False)
    straight.run()
    config = tiny_config(**run, checkpoint_dir=directory, checkpoint_every=checkpoint_every)
    Trainer(config, progress=False).run(stop_at=stop_at)
    resumed = Trainer(config, progress=False)
    start = resumed.start_step
    resumed.run()
    return parameter_digest(straight.model), parameter_digest(resumed.model), start


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    for straight, resumed, start in run_workers(interrupted_and_resumed, 2, str(tmp_path)):
        assert start == 4
        assert straight == resumed


def resume_with_other_config(rank: int, world: int, directory: str) -> str:
    Trainer(tiny_config(steps=4, checkpoint_dir=directory, checkpoint_every=2), progress=False).run()
    try:
        Trainer(tiny_config(steps=4, seed=1, checkpoint_dir=directory), progress=False)
    except ConfigMismatch as error:
        return str(error)
    return "no error"


def test_resuming_with_a_different_config_is_refused(tmp_path):
    for message in run_workers(resume_with_other_config, 2, str(tmp_path)):
        assert "different config" in message and "--checkpoint_dir" in message
