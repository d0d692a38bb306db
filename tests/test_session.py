"""disttrain.Session in a user's own loop, two real processes over Gloo: local-step rounds and
per-step methods, the same results as `disttrain train`, replica checks, save and resume."""

import logging

import pytest
import torch
from distributed import run_workers
from test_digest_regression import recorded_digest
from tiny import TINY_DATA, TINY_MODEL, tiny_config
from torch import nn

import disttrain
import disttrain.methods
from disttrain.data.corpus import ByteCorpus
from disttrain.models.gpt import GPT
from disttrain.train.config import OptimConfig
from disttrain.train.optimizer import build_optimizer
from disttrain.train.trainer import learning_rate

STEPS = 20
FLAGS_OPTIM = OptimConfig(warmup_steps=2)  # what TINY_FLAGS give: each method's own peak lr


class Position:
    """A data position the loop registers with the session (what a resumed loop seeks to)."""

    def __init__(self) -> None:
        self.batches_read = 0

    def state_dict(self) -> dict:
        return {"batches_read": self.batches_read}

    def load_state_dict(self, state: dict) -> None:
        self.batches_read = state["batches_read"]


def gpt_session(method: str, check_every: int = 0) -> tuple[GPT, disttrain.Session]:
    """The tiny GPT and AdamW as `disttrain train` builds them, under a Session."""
    config = tiny_config(method=method, optim=FLAGS_OPTIM)
    torch.manual_seed(config.seed)
    model = GPT(TINY_MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
    return model, disttrain.Session(model, optimizer, method, check_every=check_every)


def train_gpt(model: GPT, session: disttrain.Session, rank: int, world: int, steps: range, position: Position) -> list[float]:
    """The loop `disttrain train` runs, written as a user would: its schedule, its batches."""
    config = tiny_config(method=session.method.name, steps=STEPS, optim=FLAGS_OPTIM)
    corpus = ByteCorpus(TINY_DATA, config.seed)
    losses = []
    for step in steps:
        for group in session.optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        _, loss = model(*corpus.train_batch(step, rank, world))
        session.backward(loss)
        session.step()
        session.zero_grad()
        position.batches_read += 1
        losses.append(loss.item())
    return losses


def rounds_scenarios(rank: int, world: int, checkpoint_dir: str) -> dict:
    model, session = gpt_session("diloco-sparse-k4-h5", check_every=5)
    position = Position()
    session.register_state("data", position)
    in_sync = []
    losses = train_gpt(model, session, rank, world, range(10), position)
    session.save(checkpoint_dir)
    in_sync.append(session.in_sync)
    losses += train_gpt(model, session, rank, world, range(10, 12), position)
    mid_round = {"in_sync": session.in_sync}
    for name, call in (("check", session.check_replicas), ("save", session.state_dict)):
        with pytest.raises(RuntimeError) as error:
            call()
        mid_round[name] = str(error.value)
    losses += train_gpt(model, session, rank, world, range(12, STEPS), position)
    session.finish()
    resumed_model, resumed = gpt_session("diloco-sparse-k4-h5")
    resumed_position = Position()
    resumed.register_state("data", resumed_position)
    resumed.load(checkpoint_dir)
    train_gpt(resumed_model, resumed, rank, world, range(resumed_position.batches_read, STEPS), resumed_position)
    return {
        "losses": losses,
        "summary": session.summary(),
        "in_sync_at_round_end": in_sync,
        "mid_round": mid_round,
        "resumed_digest": resumed.parameters_digest()[:16],
        "resumed_steps": resumed.steps,
    }


def per_step_scenario(rank: int, world: int) -> dict:
    model, session = gpt_session("power-int4-r16", check_every=10)
    train_gpt(model, session, rank, world, range(STEPS), Position())
    return session.summary()


def both(rank: int, world: int, checkpoint_dir: str) -> tuple[dict, dict]:
    """Both scenarios in one pair of processes: starting processes is most of the time."""
    return rounds_scenarios(rank, world, checkpoint_dir), per_step_scenario(rank, world)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[tuple[dict, dict]]:
    return run_workers(both, 2, str(tmp_path_factory.mktemp("session")))


@pytest.fixture(scope="module")
def rounds(results) -> list[dict]:
    return [r for r, _ in results]


def test_local_step_rounds_in_a_user_loop_give_disttrain_trains_parameters_bit_for_bit(rounds):
    assert rounds[0]["summary"]["parameter_digest"] == recorded_digest("diloco-sparse-k4-h5")
    assert rounds[1]["summary"]["parameter_digest"] == recorded_digest("diloco-sparse-k4-h5")


def test_per_step_method_in_a_user_loop_gives_disttrain_trains_parameters_bit_for_bit(results):
    assert {per_step["parameter_digest"] for _, per_step in results} == {recorded_digest("power-int4-r16")}
    assert all(per_step["replicas_identical"] for _, per_step in results)


def test_rounds_send_over_a_thousand_times_fewer_bytes_than_dense(rounds):
    summary = rounds[0]["summary"]
    assert summary["compression_ratio"] >= 1000 and summary["total_bytes"] > 0
    assert summary["steps"] == STEPS and summary["method"] == "diloco-sparse-k4-h5"


def test_replicas_are_checked_at_round_ends_and_found_identical(rounds):
    assert all(r["summary"]["replicas_identical"] and r["in_sync_at_round_end"] == [True] for r in rounds)


def test_mid_round_the_session_refuses_replica_checks_and_checkpoints(rounds):
    mid = rounds[0]["mid_round"]
    assert mid["in_sync"] is False
    assert "replicas agree only at round ends" in mid["check"]
    assert "a checkpoint of local-step rounds is taken at a round end" in mid["save"]


def test_a_saved_session_resumes_bit_for_bit_with_its_registered_state(rounds):
    for r in rounds:
        assert r["resumed_digest"] == r["summary"]["parameter_digest"] and r["resumed_steps"] == STEPS


def test_loss_falls_in_a_user_loop(rounds):
    losses = rounds[0]["losses"]
    assert sum(losses[-3:]) < sum(losses[:3])


def one_process_group(rank: int, world: int, method: str, options: dict) -> str:
    model = nn.Linear(64, 64)
    with pytest.raises((ValueError, TypeError)) as error:
        disttrain.Session(model, torch.optim.SGD(model.parameters(), lr=0.1), method, **options)
    return str(error.value)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("svd-projected", {}, "build the optimizer as disttrain.optim.ProjectedAdamW"),
        ("power-int4-r16", {"local_steps": 5}, "local_steps applies to local-step methods"),
        ("diloco-sparse-k4-h5", {"rnk": 4}, "unknown compression option(s) ['rnk']"),
    ],
)
def test_what_a_session_cannot_run_is_refused_with_the_fix(method, options, message):
    assert message in run_workers(one_process_group, 1, method, options)[0]


def test_a_session_without_a_process_group_says_to_use_torchrun():
    model = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="launch your script with torchrun.*init_process_group"):
        disttrain.Session(model, torch.optim.SGD(model.parameters(), lr=0.1))


def starting_weights(rank: int, world: int, seed_of_rank: bool) -> tuple[str, bool]:
    """(this rank's parameter digest after Session start, whether the start broadcast anything)."""
    torch.manual_seed(rank if seed_of_rank else 0)
    model = GPT(TINY_MODEL)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("disttrain.train.replica").addHandler(handler)
    logging.getLogger("disttrain.train.replica").setLevel(logging.INFO)
    session = disttrain.Session(model, torch.optim.AdamW(model.parameters()), "diloco-sparse-k4-h5")
    return session.parameters_digest(), any("broadcasting rank 0's" in r.getMessage() for r in records)


def test_ranks_that_start_from_other_weights_start_from_rank_0s():
    (digest_0, sent_0), (digest_1, sent_1) = run_workers(starting_weights, 2, True)
    assert digest_0 == digest_1 and sent_0 and sent_1


def test_ranks_that_start_identical_send_no_weights_at_the_start():
    (digest_0, sent_0), (digest_1, sent_1) = run_workers(starting_weights, 2, False)
    assert digest_0 == digest_1 and not sent_0 and not sent_1


def repaired_rounds(rank: int, world: int) -> tuple[bool, bool, str]:
    """Rank 1's weights and round start diverge; the check repairs both, and the next round agrees."""
    model, session = gpt_session("diloco-sparse-k4-h5")
    train_gpt(model, session, rank, world, range(5), Position())
    if rank == 1:
        with torch.no_grad():
            for p, start in zip(model.parameters(), session.exchange.outer.global_params):
                p.add_(0.01)
                start.add_(0.01)
    first = session.check_replicas()
    train_gpt(model, session, rank, world, range(5, 10), Position())
    return first, session.check_replicas(), session.parameters_digest()


def test_a_replica_check_repairs_diverged_rounds_so_that_the_next_round_agrees():
    (found_0, after_0, digest_0), (found_1, after_1, digest_1) = run_workers(repaired_rounds, 2)
    assert not found_0 and not found_1
    assert after_0 and after_1 and digest_0 == digest_1


def every_method(rank: int, world: int) -> dict[str, tuple[str, bool, int]]:
    """Three steps of every registered method in a user loop with a closure: (digest, replicas identical, bytes)."""
    results = {}
    for name, method in disttrain.methods.METHODS.items():
        config = tiny_config(method=name, steps=3, **({"rank": 8} if "rank" in method.overrides else {}))  # explore < rank
        torch.manual_seed(0)
        model = GPT(TINY_MODEL)
        session = disttrain.Session(
            model, build_optimizer(model.parameters(), method, config), config.resolved_method(),
            total_steps=3, check_every=3,
        )
        corpus = ByteCorpus(TINY_DATA, config.seed)
        while session.steps < 3:
            batch = corpus.train_batch(session.steps, rank, world)
            session.step(lambda: session.module(*batch)[1])  # noqa: B023 (called at once)
        session.finish()
        results[name] = (session.parameters_digest(), session.replicas_identical, session.total_bytes)
    return results


def test_every_registered_method_runs_in_a_user_loop_and_keeps_replicas_identical():
    first, second = run_workers(every_method, 2, timeout_s=600)
    assert set(first) == set(disttrain.methods.METHODS)
    for name, (digest, identical, sent) in first.items():
        assert identical and digest == second[name][0], name
        assert sent > 0, name


def zeroth_order_backward(rank: int, world: int) -> str:
    model = nn.Linear(8, 8)
    session = disttrain.Session(model, torch.optim.SGD(model.parameters(), lr=0.1), "zo-1byte")
    with pytest.raises(RuntimeError) as error:
        session.backward(model(torch.ones(1, 8)).sum())
    return str(error.value)


def test_a_zeroth_order_method_asks_for_the_forward_pass_as_a_closure_instead_of_backward():
    assert "give session.step() the forward pass as a closure" in run_workers(zeroth_order_backward, 1)[0]
