"""Overlapped rounds: each round's exchange runs behind the next round's local steps, the outer step lands one
round late, the global weights agree at every round end and the models at every drain."""

import dataclasses

import pytest
import torch
from distributed import run_workers
from test_training import interrupted_and_resumed, train_and_digest
from tiny import TINY_MODEL

import disttrain
from disttrain.methods import Method, get_method, register
from disttrain.models.gpt import GPT
from disttrain.train.config import TrainConfig
from disttrain.train.replica import parameter_digest

OVERLAPPED = "diloco-sparse-k4-h5-overlap"
EAGER = "diloco-sparse-k4-h5-overlap-eager"


def digests_after_each_round(rank: int, world: int, method: Method, rounds: int) -> list[tuple[bytes, bytes, bool]]:
    """(global weights' digest, model's digest, in_sync) after every round end of a Session in a plain loop."""
    torch.manual_seed(0)
    model = GPT(TINY_MODEL)
    session = disttrain.Session(model, torch.optim.AdamW(model.parameters(), lr=3e-3), method)
    generator = torch.Generator().manual_seed(rank)
    seen: list[tuple[bytes, bytes, bool]] = []
    while session.steps < rounds * method.local_steps:
        tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, TINY_MODEL.block_size + 1), generator=generator)
        session.step(lambda: model(tokens[:, :-1], tokens[:, 1:])[1])
        if session.steps % method.local_steps == 0:
            seen.append((session.replica_digest(), parameter_digest(model), session.in_sync))
    return seen


def overlapped(drain_every: int, name: str = OVERLAPPED) -> Method:
    return dataclasses.replace(get_method(name), local_steps=2, drain_every=drain_every)


@pytest.mark.parametrize("name", [OVERLAPPED, EAGER])
def test_global_weights_agree_at_every_round_end_and_models_at_every_drain(name):
    per_worker = run_workers(digests_after_each_round, 3, overlapped(drain_every=3, name=name), 6)
    for round_index, seen in enumerate(zip(*per_worker)):
        globals_, models, in_sync = zip(*seen)
        assert len(set(globals_)) == 1
        drained = (round_index + 1) % 3 == 0
        assert all(flag == drained for flag in in_sync)
        assert (len(set(models)) == 1) == drained  # between drains each model carries its own progress


def global_digest_before_any_outer_step(rank: int, world: int) -> tuple[bytes, bytes]:
    torch.manual_seed(0)
    model = GPT(TINY_MODEL)
    session = disttrain.Session(model, torch.optim.AdamW(model.parameters(), lr=3e-3), overlapped(drain_every=100))
    start = session.replica_digest()
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, TINY_MODEL.block_size + 1), generator=torch.Generator().manual_seed(rank))
    seen = [start]
    for _ in range(2):
        for _ in range(2):  # a round of two local steps: its exchange is launched at its end
            session.step(lambda: model(tokens[:, :-1], tokens[:, 1:])[1])
        seen.append(session.replica_digest())
    return seen


def test_a_rounds_outer_step_lands_at_the_next_round_end():
    for start, after_one_round, after_two in run_workers(global_digest_before_any_outer_step, 2):
        assert after_one_round == start
        assert after_two != start


@pytest.mark.parametrize("name, lands_where_it_started", [(EAGER, True), (OVERLAPPED, False)])
def test_an_eager_worker_starts_its_next_round_where_its_own_outer_step_puts_the_global_weights(name, lands_where_it_started):
    """Alone, a worker's own update is the mean: the eager start of round 2 is exactly where the global
    weights land when round 1's exchange completes (an overlapped worker goes on from its own weights)."""
    (seen,) = run_workers(digests_after_each_round, 1, overlapped(drain_every=100, name=name), 2)
    (_, model_after_round_1, _), (global_after_round_2, _, _) = seen
    assert (model_after_round_1 == global_after_round_2) == lands_where_it_started


def test_eager_outer_steps_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="eager outer steps are for overlapped rounds"):
        register(dataclasses.replace(get_method(EAGER), name="eager-with-momentum", outer_momentum=0.9))


def test_an_overlapped_run_ends_with_bit_identical_replicas_and_a_falling_loss():
    results = run_workers(train_and_digest, 2, {"method": OVERLAPPED, "steps": 24, "local_steps": 2, "eval_every": 20})
    assert len({r["digest"] for r in results}) == 1
    summary = results[0]["summary"]
    assert summary.replicas_identical
    assert [point.step for point in summary.history] == [20, 24]  # evaluations wait for a drain (every 10 rounds) or the end
    assert summary.history[-1].val_loss < summary.history[0].val_loss + 0.5 and summary.history[-1].val_loss < 5.0


def test_checkpoints_are_taken_at_drains_and_a_resumed_run_ends_bit_identical(tmp_path):
    run = {"method": OVERLAPPED, "local_steps": 1, "steps": 24, "eval_every": 100}
    # Checkpoints are due every 4 steps, stops after step 15 (mid-overlap); the last drain was step 10.
    for straight, resumed, start in run_workers(interrupted_and_resumed, 2, str(tmp_path), run, 4, 15):
        assert start == 10
        assert straight == resumed


def drop_the_exchange_in_flight(rank: int, world: int) -> tuple[bytes, bytes, bytes, bool, bytes]:
    """Two rounds (the second's exchange in flight), then what a failed generation does to this worker,
    then one more round and the end: (global before, model after, global after, in_sync, final model)."""
    torch.manual_seed(0)
    model = GPT(TINY_MODEL)
    session = disttrain.Session(model, torch.optim.AdamW(model.parameters(), lr=3e-3), overlapped(drain_every=100))
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, TINY_MODEL.block_size + 1), generator=generator)
    for _ in range(4):
        session.step(lambda: model(tokens[:, :-1], tokens[:, 1:])[1])
    before = session.replica_digest()
    session.exchange.generation_failed()
    seen = (before, parameter_digest(model), session.replica_digest(), session.in_sync)
    for _ in range(2):
        session.step(lambda: model(tokens[:, :-1], tokens[:, 1:])[1])
    session.finish()
    return (*seen, parameter_digest(model))


def test_a_failed_generation_drops_the_exchange_in_flight_and_every_worker_restarts_from_the_global_weights():
    results = run_workers(drop_the_exchange_in_flight, 2)
    for before, model_after, global_after, in_sync, _ in results:
        assert global_after == before  # the dropped round's outer step never lands
        assert model_after == global_after and in_sync  # nor does this worker's local progress behind it stay
    assert len({r[1] for r in results}) == 1
    assert len({r[4] for r in results}) == 1  # the rounds after it end identical too


def test_a_round_quorum_with_an_overlapped_method_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="round-quorum.*without overlap"):
        TrainConfig(method=OVERLAPPED, round_quorum=0.75).validate()
