"""Federated fine-tuning: rounds on label-skewed shards, stragglers cut off at a quorum or a
deadline, one-byte zeroth-order steps, all in real processes."""

import time

import pytest
import torch
from distributed import run_workers
from test_training import train_and_digest
from tiny import tiny_config

from disttrain.federated.config import FederatedConfig
from disttrain.train.config import OptimConfig, TrainConfig
from disttrain.train.replica import parameter_digest
from disttrain.train.trainer import Trainer

# The pretrained MiniLM cut to one encoder layer: it trains in seconds on a CPU.
TINY_FEDERATED = FederatedConfig(label="testament", clients=2, alpha=0.5, max_length=24, batch_size=8, eval_samples=192, layers=1)
SLOW_STEP_S = 1.0


def federated_config(**overrides) -> TrainConfig:
    defaults = dict(mode="federated", steps=24, local_steps=4, eval_every=8, digest_every=4, federated=TINY_FEDERATED)
    defaults.update(overrides)
    return TrainConfig(**defaults, optim=OptimConfig(lr=1e-3, warmup_steps=2))


def fine_tune(rank: int, world: int, overrides: dict) -> dict:
    trainer = Trainer(federated_config(**overrides), progress=False)
    initial_loss, _ = trainer.evaluate()
    summary = trainer.run()
    return {"digest": parameter_digest(trainer.model), "summary": summary, "initial_loss": initial_loss}


def test_federated_rounds_on_a_non_iid_split_keep_replicas_identical_and_lower_the_validation_loss():
    results = run_workers(fine_tune, 2, {})
    summary = results[0]["summary"]
    assert len({r["digest"] for r in results}) == 1 and summary.replicas_identical
    assert summary.history[-1].val_loss < results[0]["initial_loss"] - 0.05


def test_each_worker_trains_only_on_its_own_clients_shard():
    from disttrain.federated.task import VerseClassificationTask

    task = VerseClassificationTask(TINY_FEDERATED, seed=0)
    assert sorted(i for shard in task.shards for i in shard) == list(range(len(task.train_set["labels"])))
    for rank in range(4):
        own = {tuple(row.tolist()) for row in task.train_set["input_ids"][task.shard(rank)]}
        batch = task.train_batch(step=3, rank=rank, world_size=4)
        assert all(tuple(row.tolist()) in own for row in batch["input_ids"])


def train_with_a_straggler(rank: int, world: int, overrides: dict, straggler: int | None) -> str:
    """Trains the tiny GPT; rank ``straggler`` takes SLOW_STEP_S longer per forward pass."""
    trainer = Trainer(tiny_config(**overrides), progress=False)
    if rank == straggler:
        trainer.model.register_forward_pre_hook(lambda *_: time.sleep(SLOW_STEP_S))
    summary = trainer.run()
    assert summary.replicas_identical
    return parameter_digest(trainer.model).hex()


# fp32 pseudo-gradients without error feedback: a dropped worker's zeros leave the others' sum exact.
ROUNDS = {"method": "fedavg-h10", "steps": 6, "local_steps": 3, "eval_every": 100, "digest_every": 3}


# The deadline leaves the fast workers ample time to finish together, and the straggler none (3 steps of 1 s a round).
@pytest.mark.parametrize(
    "closing", [{"round_quorum": 0.6}, pytest.param({"round_deadline_s": 1.5}, marks=pytest.mark.slow)], ids=["quorum", "deadline"]
)
def test_a_round_closes_without_the_straggler_and_drops_its_work(closing):
    with_straggler = run_workers(train_with_a_straggler, 3, {**ROUNDS, **closing}, 2)
    without_it = run_workers(train_with_a_straggler, 2, ROUNDS, None)
    assert len(set(with_straggler)) == 1
    assert with_straggler[0] == without_it[0]


@pytest.mark.slow
def test_without_a_quorum_or_deadline_every_round_waits_for_the_straggler():
    with_straggler = run_workers(train_with_a_straggler, 3, ROUNDS, 2)
    without_it = run_workers(train_with_a_straggler, 2, ROUNDS, None)
    assert len(set(with_straggler)) == 1
    assert with_straggler[0] != without_it[0]


@pytest.mark.slow  # 7 s; tests/test_zeroth_order.py runs two real clients
def test_zeroth_order_training_sends_one_byte_per_step_and_keeps_replicas_identical():
    overrides = {"method": "zo-1byte", "steps": 5, "digest_every": 1, "eval_every": 100}
    results = run_workers(train_and_digest, 3, overrides)
    assert len({r["digest"] for r in results}) == 1
    assert results[0]["summary"].total_bytes == 5


@pytest.mark.slow
def test_zeroth_order_steps_lower_the_loss_of_a_pretrained_classifier():
    zo = {"lr": 2e-4, "eps": 1e-3}
    overrides = {"method": "zo-1byte", "steps": 60, "eval_every": 60, "local_steps": None}
    initial_loss, summary = run_workers(zo_fine_tune, 2, overrides, zo)[0]
    assert summary.history[-1].val_loss < initial_loss


def zo_fine_tune(rank: int, world: int, overrides: dict, zo: dict):
    from disttrain.federated.zeroth_order import ZOConfig

    trainer = Trainer(federated_config(**overrides, zeroth_order=ZOConfig(**zo)), progress=False)
    initial_loss, _ = trainer.evaluate()
    return initial_loss, trainer.run()


def test_federated_mode_refuses_a_per_step_method_and_names_the_fix():
    with pytest.raises(ValueError, match="federated mode trains in rounds.*fedavg"):
        TrainConfig(mode="federated", method="svd-int8-reconstruct").validate()


def test_federated_mode_defaults_to_a_round_method():
    assert TrainConfig(mode="federated").method_name == "fedavg-votes-k1-h13"


@pytest.mark.parametrize("bad", [{"round_quorum": 0.0}, {"round_quorum": 1.5}, {"round_deadline_s": -1.0}])
def test_round_closing_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match="round-"):
        TrainConfig(method="fedavg-h10", **bad).validate()


def test_round_closing_on_a_method_without_rounds_is_refused():
    with pytest.raises(ValueError, match="close local-step rounds"):
        TrainConfig(method="svd-int8-reconstruct", round_quorum=0.5).validate()


def test_int8_payload_of_a_vector_has_one_scale():
    from disttrain.compress.factory import CompressionSpec, build_compressor

    spec = CompressionSpec(basis="seeded", payload="int8", quantize_small=True, error_feedback=False)
    compressor = build_compressor(spec, torch.Size([384]), 0, 0)
    grad = torch.randn(384)
    assert compressor.wire_bytes() == 384 + 4
    assert torch.allclose(compressor.round_trip(grad), grad, atol=grad.abs().max().item() / 127)
