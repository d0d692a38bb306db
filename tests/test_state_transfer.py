"""State transfer at a generation's start, in real processes over a real Gloo group, with every
wait polled as it is under a coordinator."""

from __future__ import annotations

import torch
from distributed import run_workers

from disttrain.comm.waiting import abort_waits_when
from disttrain.elastic.transfer import plan_sync, synchronise

STATE_BYTES = 200_000_000  # far more than one 0.1 s poll can move


def _transfer_large_state(rank: int, world_size: int, fresh_ranks: tuple[int, ...]) -> dict:
    abort_waits_when(lambda: False)  # polled waits, as under a coordinator
    fresh = rank in fresh_ranks
    state = {"weights": torch.full((STATE_BYTES // 4,), 0.0 if fresh else 7.0), "step": 0 if fresh else 40}
    received: dict = {}
    digest = bytes(32) if fresh else bytes(range(32))
    plan = synchronise(state["step"], fresh, digest, lambda: state, received.update)
    abort_waits_when(None)
    weights = received.get("weights")
    return {
        "donor": plan.donor, "receivers": plan.receivers, "received": bool(received),
        "step": received.get("step"), "all_sevens": weights is not None and bool((weights == 7.0).all()),
    }


def test_a_state_larger_than_one_poll_reaches_every_joiner_and_no_one_else():
    results = run_workers(_transfer_large_state, 3, (1,), timeout_s=240)
    assert [r["donor"] for r in results] == [0, 0, 0] and results[0]["receivers"] == (1,)
    assert results[1]["received"] and results[1]["step"] == 40 and results[1]["all_sevens"]
    assert not results[0]["received"] and not results[2]["received"]


def test_the_donor_is_the_lowest_non_fresh_rank_at_the_highest_step():
    rows = torch.tensor([[5, 1, *range(32)], [9, 0, *range(32)], [9, 0, *range(32)], [9, 0, *([0] * 32)]])
    plan = plan_sync(rows)
    assert plan.donor == 1 and plan.receivers == (0, 3) and plan.step == 9


def test_fresh_workers_with_identical_digests_at_the_start_need_no_transfer():
    rows = torch.tensor([[0, 1, *range(32)]] * 3)
    plan = plan_sync(rows)
    assert plan.donor == 0 and plan.receivers == ()
