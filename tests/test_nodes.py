"""A node of several processes as one worker (inner "ddp"): real processes over Gloo, laid out as
torchrun lays out 2 nodes x 2 processes; DDP inside each node, the compressed exchange between
nodes, each local rank carrying its share of the parameters."""

import pytest
import torch
from distributed import run_workers
from hypothesis import given
from hypothesis import strategies as st
from tiny import TINY_DATA, TINY_MODEL

import disttrain
from disttrain.comm.layout import balanced_shares
from disttrain.data.corpus import ByteCorpus
from disttrain.methods import get_method
from disttrain.models.gpt import GPT

METHOD = "diloco-sparse-k4-h5"
STEPS = 10


def gpt_session(inner: str, **options) -> tuple[GPT, disttrain.Session]:
    torch.manual_seed(0)
    model = GPT(TINY_MODEL)
    if inner == "fsdp":
        disttrain.shard_within_node(model)  # before the optimizer: it must hold the shards
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    return model, disttrain.Session(model, optimizer, METHOD, inner=inner, total_steps=STEPS, **options)


def train(session: disttrain.Session, rank: int, world: int, steps: range, digests: list[str] | None = None) -> list[float]:
    corpus = ByteCorpus(TINY_DATA, 0)
    losses = []
    for step in steps:
        _, loss = session.module(*corpus.train_batch(step, rank, world))
        session.backward(loss)
        session.step()
        session.zero_grad()
        losses.append(loss.item())
        if digests is not None:
            digests.append(session.parameters_digest())
    return losses


def node_run(rank: int, world: int, inner: str) -> dict:
    model, session = gpt_session(inner)
    digests: list[str] = []
    losses = train(session, rank, world, range(STEPS), digests)
    session.finish()
    return {
        "summary": session.summary(),
        "digests": digests,
        "losses": losses,
        "identical": session.check_replicas(),
        "share": [p.numel() for p in session.exchange.reducer.params],
        "held": session.held_bytes(),
    }


@pytest.fixture(scope="module")
def nodes() -> list[dict]:
    return run_workers(node_run, 4, "auto", per_node=2)


@pytest.fixture(scope="module")
def sharded() -> list[dict]:
    return run_workers(node_run, 4, "fsdp", per_node=2)


@pytest.fixture(scope="module")
def flat_two() -> list[dict]:
    """Two single-process workers: what the 2 nodes' slow link would carry with one process each."""
    return run_workers(node_run, 2, "flat")


def test_auto_makes_each_node_of_several_processes_one_worker(nodes):
    assert {(r["summary"]["workers"], r["summary"]["processes_per_worker"]) for r in nodes} == {(2, 2)}


def test_the_processes_of_a_node_hold_the_same_weights_after_every_step(nodes):
    for node in (nodes[0:2], nodes[2:4]):
        assert node[0]["digests"] == node[1]["digests"]


def test_every_process_of_every_node_ends_bit_identical(nodes):
    assert len({r["summary"]["parameter_digest"] for r in nodes}) == 1
    assert all(r["identical"] for r in nodes)


def test_the_local_ranks_of_a_node_split_the_parameters_between_them(nodes):
    total = sum(p.numel() for p in GPT(TINY_MODEL).parameters())
    assert sum(nodes[0]["share"]) + sum(nodes[1]["share"]) == total
    assert nodes[0]["share"] == nodes[2]["share"] and nodes[1]["share"] == nodes[3]["share"]
    assert abs(sum(nodes[0]["share"]) - sum(nodes[1]["share"])) < 0.2 * total


def test_a_node_sends_one_workers_payload_not_one_per_process(nodes, flat_two):
    node_bytes = nodes[0]["summary"]["bytes_per_step"]
    flat_bytes = flat_two[0]["summary"]["bytes_per_step"]
    assert node_bytes == pytest.approx(flat_bytes, rel=0.05)


def test_loss_falls_with_nodes(nodes):
    losses = nodes[0]["losses"]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_under_fsdp_the_same_local_rank_of_every_node_holds_the_same_shard_after_every_round(sharded):
    assert sharded[0]["digests"][4::5] == sharded[2]["digests"][4::5] and sharded[1]["digests"][4::5] == sharded[3]["digests"][4::5]
    assert sharded[0]["digests"] != sharded[1]["digests"]  # each local rank holds its own shard
    assert all(r["identical"] for r in sharded)


def test_under_fsdp_each_process_holds_about_half_the_parameters_and_optimizer_state_that_ddp_holds(nodes, sharded):
    for r in sharded:
        for kind in ("parameters", "optimizer"):
            assert r["held"][kind] == pytest.approx(nodes[0]["held"][kind] / 2, rel=0.05)


def test_both_ways_a_process_holds_the_exchange_state_of_its_share_only(nodes, sharded):
    total = sum(r["held"]["exchange"] for r in nodes[:2])
    for r in (*nodes, *sharded):
        assert r["held"]["exchange"] == pytest.approx(total / 2, rel=0.2)


def test_under_fsdp_every_process_exchanges_a_shard_of_every_parameter(sharded):
    total = sum(p.numel() for p in GPT(TINY_MODEL).parameters())
    assert len(sharded[0]["share"]) == len(list(GPT(TINY_MODEL).parameters()))
    assert sum(sharded[0]["share"]) + sum(sharded[1]["share"]) == total


def test_fsdp_and_ddp_inside_a_node_train_alike_and_send_the_same_bytes(nodes, sharded):
    assert sharded[0]["summary"]["workers"] == 2
    assert sharded[0]["losses"] == pytest.approx(nodes[0]["losses"], rel=1e-2)  # reduce-scatter and all-reduce round apart
    assert sharded[0]["summary"]["bytes_per_step"] == pytest.approx(nodes[0]["summary"]["bytes_per_step"], rel=0.05)


def one_worker_of_a_node_or_of_its_whole_batch(rank: int, world: int) -> float:
    """A node of 2 processes, each on half of a batch, or 1 process on the whole batch: the loss after 10 steps."""
    nodes = 2
    model, session = gpt_session("ddp" if world > nodes else "flat")
    corpus = ByteCorpus(TINY_DATA, 0)
    for step in range(STEPS):
        halves = [corpus.train_batch(step, 2 * node + half, 2 * nodes) for node in range(nodes) for half in range(2)]
        mine = [halves[rank]] if world > nodes else halves[2 * rank: 2 * rank + 2]
        x, y = (torch.cat([batch[i] for batch in mine]) for i in range(2))
        _, loss = session.module(x, y)
        session.backward(loss)
        session.step()
        session.zero_grad()
    session.finish()
    with torch.no_grad():
        return model(*corpus.train_batch(STEPS, 0, 1))[1].item()


def test_a_node_of_two_processes_trains_as_one_worker_with_both_their_batches():
    as_nodes = run_workers(one_worker_of_a_node_or_of_its_whole_batch, 4, per_node=2)
    as_workers = run_workers(one_worker_of_a_node_or_of_its_whole_batch, 2)
    assert as_nodes[0] == pytest.approx(as_workers[0], rel=1e-3)


def checkpointed(rank: int, world: int, directory: str, inner: str) -> tuple[str, str]:
    """Train 5 steps and save; a fresh session resumed from it trains 5 more: digests of both ways."""
    model, session = gpt_session(inner)
    train(session, rank, world, range(5))
    session.save(directory)
    train(session, rank, world, range(5, STEPS))
    session.finish()
    model, resumed = gpt_session(inner, resume_from=directory)
    train(resumed, rank, world, range(resumed.steps, STEPS))
    resumed.finish()
    return session.parameters_digest(), resumed.parameters_digest()


@pytest.mark.parametrize("inner", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_a_node_run_resumes_bit_for_bit_from_its_checkpoint(tmp_path, inner):
    results = run_workers(checkpointed, 4, str(tmp_path), inner, per_node=2)
    assert all(straight == resumed for straight, resumed in results)


def refused(rank: int, world: int, options: dict) -> str:
    model = GPT(TINY_MODEL)
    with pytest.raises(ValueError) as error:
        disttrain.Session(model, torch.optim.AdamW(model.parameters()), **options)
    return str(error.value)


@pytest.mark.parametrize(
    "per_node, options, message",
    [
        (1, {"inner": "ddp"}, "needs several processes per node: launch with torchrun --nproc-per-node"),
        (2, {"inner": "ddp", "method": "power-int4-r16"}, "pick a diloco-* or fedavg-* method without overlap, or inner 'flat'"),
        (2, {"inner": "ddp", "round_quorum": 0.5}, "use inner 'flat' with them"),
        (2, {"inner": "nodes"}, "inner must be one of auto, flat, ddp, fsdp"),
        (2, {"inner": "fsdp"}, "call disttrain.shard_within_node(model, blocks) first"),
    ],
)
def test_what_a_node_layout_cannot_run_is_refused_with_the_fix(per_node, options, message):
    assert all(message in error for error in run_workers(refused, 2, options, per_node=per_node))


def per_step_auto(rank: int, world: int) -> dict:
    model = GPT(TINY_MODEL)
    session = disttrain.Session(model, torch.optim.AdamW(model.parameters()), "power-int4-r16")
    return session.summary()


def test_auto_keeps_every_process_a_worker_for_a_method_that_cannot_make_nodes_workers():
    summary = run_workers(per_step_auto, 4, per_node=2)[0]
    assert (summary["workers"], summary["processes_per_worker"]) == (4, 1)


def test_only_local_step_methods_without_a_per_worker_subspace_make_nodes_workers():
    assert get_method("diloco-sparse-k4-h5").makes_nodes
    assert "local-step rounds only" in get_method("power-int4-r16").why_no_nodes()
    assert "per-worker subspace" in get_method("fedavg-subspace-int8-h10").why_no_nodes()


def test_one_machine_of_several_processes_stays_a_worker_per_process():
    results = run_workers(node_run, 2, "auto", per_node=2)
    assert results[0]["summary"]["workers"] == 2 and results[0]["summary"]["processes_per_worker"] == 1


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=40), st.integers(1, 6))
def test_balanced_shares_give_every_item_to_one_share_in_order_and_balance_them(sizes, parts):
    items = list(range(len(sizes)))
    shares = balanced_shares(items, sizes, parts)
    assert sorted(i for share in shares for i in share) == items
    assert all(share == sorted(share) for share in shares)
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes)
