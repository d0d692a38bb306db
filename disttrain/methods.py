"""The registry of methods: named combinations of compressor, optimizer and schedule.

The CLI, the demo and the benchmarks pick methods by name, so a new method plugs in here
without touching the data path.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Literal

from disttrain.compress.factory import CompressionSpec
from disttrain.optim.projected_adamw import RefreshMoments

Engine = Literal["disttrain", "local_steps", "overlapped_rounds", "zeroth_order", "ddp", "ddp_powersgd", "ddp_hook"]
OptimizerKind = Literal["adamw", "lean_adamw", "projected_adamw", "orthogonal", "sgd"]
Role = Literal["baseline", "study"]
RoundStart = Literal["fp32", "bf16"]  # how local-step rounds keep the round's starting weights
PROJECTED_OPTIMIZERS = ("projected_adamw", "orthogonal")  # they read the averaged coefficients themselves
REFRESHED_BASES = ("svd", "seeded", "sparse_rows")  # bases redrawn or recomputed every refresh_every steps


@dataclass(frozen=True)
class EngineTraits:
    """What an engine can do, declared once: the CLI's checks, the Session, the Hugging Face
    integration, the trainer and the benchmarks read these, not engine names."""

    compresses: bool = False  # runs the method's CompressionSpec (torch DDP and zeroth-order steps do not)
    rounds: bool = False  # local steps between exchanges: replicas agree only at round ends
    elastic: bool = False  # membership may change mid-run (the coordinator's generations)
    user_optimizer: bool = False  # the user's own optimizer applies the update (a Session, the Hugging Face Trainer)
    torch_ddp: bool = False  # runs inside torch DistributedDataParallel
    federated: bool = False  # trains without a per-step gradient exchange, as --mode federated needs
    closes_early: bool = False  # a round may close at a quorum or a deadline, without its stragglers
    overlaps: bool = False  # a round's exchange runs behind the next round's local steps (sequenced by the Session)
    nodes: bool = False  # a node of several processes can be one worker (inner "ddp": torch DDP inside it)


ENGINES: dict[Engine, EngineTraits] = {
    "disttrain": EngineTraits(compresses=True, elastic=True, user_optimizer=True),
    "local_steps": EngineTraits(
        compresses=True, rounds=True, elastic=True, user_optimizer=True, federated=True, closes_early=True, nodes=True
    ),
    "overlapped_rounds": EngineTraits(compresses=True, rounds=True, elastic=True, user_optimizer=True, overlaps=True),
    "zeroth_order": EngineTraits(federated=True),
    "ddp": EngineTraits(user_optimizer=True, torch_ddp=True),
    "ddp_powersgd": EngineTraits(user_optimizer=True, torch_ddp=True),
    "ddp_hook": EngineTraits(compresses=True, user_optimizer=True, torch_ddp=True),
}


@dataclass(frozen=True)
class Method:
    """How gradients are exchanged and applied.

    engine "disttrain" uses CompressedAllReduce; "ddp" is plain torch DDP; "ddp_powersgd" is torch DDP with torch's
    powerSGD_hook (the baseline); "ddp_hook" is torch DDP with disttrain_hook. "local_steps" runs
    DiLoCo rounds: ``local_steps`` inner AdamW steps, then one compressed exchange of the
    pseudo-gradient and an outer SGD step (``outer_lr``; Nesterov with ``outer_momentum`` > 0):
    FedAvg is outer_lr 1 without momentum. "overlapped_rounds" runs the same rounds with each exchange
    behind the next round's local steps (the outer step one round late, replicas agreeing every ``drain_every`` rounds). "zeroth_order" sends one byte per step (shared-seed SPSA).
    optimizer "adamw" reconstructs the averaged gradient for torch AdamW ("lean_adamw": the same update
    from a bf16 first moment and a factored second moment, ``optim/lean_adamw.py``); "projected_adamw"
    keeps Adam moments in the projected space (GaLore); "orthogonal" moves projected weights by
    the orthogonalised reconstruction F U V^T (Muon / Dion style); "sgd" applies the average as it is
    (for payloads that already are update directions, e.g. sparse momentum votes).
    role "baseline" marks what the methods are measured against (dense, DDP, PowerSGD); `disttrain methods` groups by it.
    """

    name: str
    summary: str
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    optimizer: OptimizerKind = "adamw"
    engine: Engine = "disttrain"
    powersgd_rank: int = 4
    local_steps: int = 1
    galore_scale: float = 1.0  # ProjectedAdamW's update scale (alpha in GaLore)
    refresh_moments: RefreshMoments = "keep"  # ProjectedAdamW's moments when the basis changes
    lr: float = 1e-3  # peak learning rate unless --optim.lr says otherwise
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_lr_scheduled: bool = False  # the outer lr follows the inner lr's warm-up and decay (for vote payloads)
    drain_every: int = 10  # overlapped rounds: every this many rounds the exchange is waited for and replicas agree
    # Overlapped rounds: while the exchange is in flight, take the outer step with this worker's own update
    # (what it sent, decoded alone) and correct it to the mean when that arrives ("eager updates").
    eager: bool = False
    round_start: RoundStart = "fp32"  # local-step rounds: "bf16" keeps each matrix's round start in half the memory
    # Local-step rounds with "projected_adamw": the seeded subspace local steps stay in, where it is not the
    # exchange's own basis (e.g. votes on a subspace round update).
    local_subspace: CompressionSpec | None = None
    role: Role = "study"

    @property
    def traits(self) -> EngineTraits:
        """What this method's engine can do."""
        return ENGINES[self.engine]

    @property
    def round_subspace(self) -> CompressionSpec:
        """The seeded basis that local steps in a subspace stay in: ``local_subspace``, else the exchange's own."""
        return self.compression if self.local_subspace is None else self.local_subspace

    @property
    def compresses(self) -> bool:
        """Whether the engine runs this method's CompressionSpec (torch DDP and zeroth-order steps do not)."""
        return self.traits.compresses

    @property
    def overrides(self) -> frozenset[str]:
        """The config overrides this method takes: rank, refresh_every, votes_per_chunk, local_steps, outer_lr."""
        spec, taken = self.compression, set()
        if self.compresses and (spec.projects or self.local_subspace is not None):
            taken.add("rank")  # of the local steps' subspace, where the method has one of its own
        if self.compresses and spec.basis in REFRESHED_BASES:
            taken.add("refresh_every")
        if self.compresses and spec.basis == "sparse_momentum":
            taken.add("votes_per_chunk")
        if self.traits.rounds:
            taken.update(("local_steps", "outer_lr"))
        return frozenset(taken)

    def why_no_nodes(self) -> str | None:
        """Why a node of several processes cannot be one worker of this method (None: it can)."""
        if not self.traits.nodes:
            return "a node of several processes is one worker of local-step rounds only: pick a diloco-* or fedavg-* method without overlap"
        if self.optimizer in PROJECTED_OPTIMIZERS:
            return (f"its inner {self.optimizer} keeps moments in a per-worker subspace, which a node's processes cannot share: "
                    "pick a method without a projected optimizer (e.g. diloco-sparse-k4-h5)")
        return None

    @property
    def makes_nodes(self) -> bool:
        """Whether a node of several processes can be one worker (inner 'ddp' or 'fsdp')."""
        return self.why_no_nodes() is None

    def require_elastic(self) -> None:
        """Refuse a method whose engine keeps its group, before it joins a coordinator's job."""
        if not self.traits.elastic:
            raise ValueError(
                f"method {self.name!r} cannot change membership ({self.engine} keeps its group): pick a disttrain "
                "per-step or local-step method for elastic training (see `disttrain methods`)"
            )

    def why_not(self, override: str) -> str:
        """Why this method does not take ``override``, and which methods do."""
        takers = [m.name for m in METHODS.values() if override in m.overrides]
        hint = f"{len(takers)} methods take it, e.g. {', '.join(takers[:3])} (see `disttrain methods`)"
        if override == "rank" and self.engine == "ddp_powersgd":
            return f"a PowerSGD baseline's rank is part of its name (powersgd-r1, -r4, -r8); {hint}"
        if override in ("local_steps", "outer_lr"):
            return f"it exchanges every step and has no rounds; {hint}"
        if not self.compresses:
            return f"it runs {self.engine} and compresses nothing; {hint}"
        what = {
            "rank": "has no low-rank basis", "refresh_every": "has no basis to refresh", "votes_per_chunk": "is not sparse votes",
        }[override]
        return f"its {self.compression.basis} payload {what}; {hint}"


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.eager and (not method.traits.overlaps or method.outer_momentum > 0 or method.compression.vote_reduction != "all_gather"):
        raise ValueError(
            f"method {method.name!r}: eager outer steps are for overlapped rounds with a plain outer SGD (no momentum) "
            "and payloads every worker decodes (not owner-summed votes)"
        )
    if method.local_subspace is not None and (method.optimizer != "projected_adamw" or not method.traits.rounds):
        raise ValueError(f"method {method.name!r}: a local_subspace is for local-step rounds with projected_adamw")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, METHODS, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"unknown method {name!r}; {hint}`disttrain methods` lists them all") from None


def with_overrides(method: Method, **compression: object) -> Method:
    """The method with some compression fields replaced (None values are ignored); a method whose local
    steps keep to a subspace of their own takes the rank there."""
    changes = {k: v for k, v in compression.items() if v is not None}
    if method.local_subspace is not None and "rank" in changes:
        method = replace(method, local_subspace=replace(method.local_subspace, rank=changes.pop("rank")))
    return replace(method, compression=replace(method.compression, **changes)) if changes else method


_SVD = CompressionSpec(basis="svd", rank=8, refresh_every=200, error_feedback=True)
_SEEDED = CompressionSpec(basis="seeded", rank=8, refresh_every=1, error_feedback=True)
_SEEDED_FIXED = CompressionSpec(basis="seeded", rank=8, refresh_every=200, error_feedback=False)

register(Method("dense", "fp32 all-reduce of full gradients + AdamW (what DDP sends)", CompressionSpec(basis="dense"), role="baseline"))
register(Method("ddp", "plain torch DDP: fp32 all-reduce of full gradients + AdamW", CompressionSpec(basis="dense"), engine="ddp", role="baseline"))
for _rank in (1, 4, 8):
    register(Method(f"powersgd-r{_rank}", f"torch DDP + powerSGD_hook rank {_rank}, one bucket (the baseline)", engine="ddp_powersgd", powersgd_rank=_rank, role="baseline"))
register(Method("svd-projected", "GaLore: SVD basis r=8 every 200 steps, Adam moments in the subspace", replace(_SVD, error_feedback=False), "projected_adamw"))
for _policy in ("reproject", "reset"):
    register(Method(
        f"svd-projected-{_policy}", f"GaLore: SVD basis r=8 every 200 steps, Adam moments in the subspace, {_policy} at a refresh",
        replace(_SVD, error_feedback=False), "projected_adamw", refresh_moments=_policy,
    ))
register(Method(
    "flora-int8-r8",
    "Flora-style: seeded basis r=8 redrawn every 10 steps (0 basis bytes), int8, Adam moments in the subspace re-projected at each redraw",
    replace(_SEEDED_FIXED, refresh_every=10, payload="int8"), "projected_adamw", refresh_moments="reproject",
))
_ROWS = CompressionSpec(basis="sparse_rows", rank=8, refresh_every=10, payload="int8", error_feedback=True)
register(Method(
    "grass-int8-r8",
    "GRASS-style sparse projection: the 8 rows of largest norm in rank 0's gradient + residual, "
    "re-chosen every 10 steps (8 indices broadcast), int8, error feedback, AdamW on the reconstruction",
    _ROWS,
))
register(Method(
    "grass-projected-r8",
    "GRASS as published: the 8 rows of largest norm, re-chosen every 200 steps, Adam moments in the subspace "
    "(re-projected at a refresh), no error feedback",
    replace(_ROWS, refresh_every=200, payload="fp32", error_feedback=False), "projected_adamw", refresh_moments="reproject",
))
register(Method("svd-reconstruct", "SVD basis r=8 every 200 steps, error feedback, AdamW on the reconstruction", _SVD))
register(Method("svd-int8-reconstruct", "SVD basis r=8, int8 payload, error feedback, AdamW on the reconstruction", replace(_SVD, payload="int8")))
register(Method("seeded-projected", "seeded Gaussian basis r=8 every 200 steps, Adam moments in the subspace", _SEEDED_FIXED, "projected_adamw"))
register(Method("seeded-reconstruct", "seeded Gaussian basis r=8 redrawn every step, error feedback, AdamW", _SEEDED))
register(Method("seeded-int8-projected", "seeded basis r=8 every 200 steps, int8 payload, Adam moments in the subspace", replace(_SEEDED_FIXED, payload="int8"), "projected_adamw"))
register(Method("seeded-int8-reconstruct", "seeded basis r=8 redrawn every step, int8, error feedback, AdamW", replace(_SEEDED, payload="int8")))
_POWER = CompressionSpec(basis="power", rank=8, error_feedback=True)
register(Method("power-r8", "basis that follows the gradient for free: one power step per exchange, sides alternate, r=8, error feedback, AdamW", _POWER))
register(Method("power-int8-r8", "power-step basis r=8 (no basis bytes), int8 payload, error feedback, AdamW on the reconstruction", replace(_POWER, payload="int8")))
register(Method("power-int4-r16", "power-step basis r=16, 4-bit payload (about the bytes of int8 at r=8), error feedback, AdamW", replace(_POWER, rank=16, payload="int4")))
register(Method(
    "power-int4-r16-explore4",
    "power-int4-r16 whose factor follows the top 12 directions and explores 4 fresh seeded random ones each step",
    replace(_POWER, rank=16, payload="int4", explore=4),
))
for _bits, _rank in ((2, 32), (1, 64)):
    register(Method(
        f"power-int{_bits}-r{_rank}",
        f"power-step basis r={_rank}, {_bits}-bit payload (the payload bytes of power-int4-r16), error feedback, AdamW",
        replace(_POWER, rank=_rank, payload=f"int{_bits}"),
    ))
register(Method(
    "power-int8-orth-r8",
    "power-step basis r=8, int8, Dion-style error feedback (keeps 0.95 of what was sent as momentum), orthogonalised update F U V^T",
    replace(_POWER, payload="int8", feedback_momentum=0.95), "orthogonal", lr=3e-3,
))
_PSEUDO_INT8 = CompressionSpec(basis="dense", payload="int8", error_feedback=True)

register(Method("diloco-h10", "DiLoCo: 10 local AdamW steps, fp32 pseudo-gradient, outer Nesterov", CompressionSpec(basis="dense"), engine="local_steps", local_steps=10))
register(Method("diloco-int8-h30", "DiLoCo: 30 local steps, int8 pseudo-gradient with error feedback", _PSEUDO_INT8, engine="local_steps", local_steps=30))
for _bits, _rounds in ((4, 30), (2, 80), (1, 40)):
    register(Method(
        f"diloco-int{_bits}-h{_rounds}",
        f"DiLoCo: {_rounds} local steps, {_bits}-bit pseudo-gradient (every tensor, per-row scales) with error feedback",
        replace(_PSEUDO_INT8, payload=f"int{_bits}", quantize_small=True), engine="local_steps", local_steps=_rounds,
    ))
register(Method("diloco-svd-int8-h10", "DiLoCo, pseudo-gradient in an SVD basis r=8 (refresh every 10 rounds), int8, EF: a measured loser, it diverges after the first refresh", replace(_SVD, payload="int8", refresh_every=10), engine="local_steps", local_steps=10))
_VOTES = CompressionSpec(basis="sparse_momentum", error_feedback=False)
register(Method(
    "sparse-momentum-k4",
    "DeMo-style: local momentum, its 4 largest entries per 256 sent as (position, sign) votes and removed, SGD on the mean vote",
    _VOTES, "sgd", lr=0.03,
))
register(Method(
    "sign-votes-1in5",
    "Lion's sign of each worker's momentum, voted on a seeded rotating 1 in 5 coordinates "
    "(one bit each, no positions: 160x), SGD on the mean vote",
    CompressionSpec(basis="sign_votes", error_feedback=False, vote_every=5), "sgd", lr=1e-3,
))
_SPARSE_ROUNDS = dict(engine="local_steps", lr=3e-3, outer_lr=0.05, outer_momentum=0.0, outer_lr_scheduled=True)
_SPARSE_OUTER = "outer SGD lr 0.05 following the schedule, no outer momentum"
for _votes, _rounds in ((4, 5), (4, 10), (8, 10), (2, 5)):
    register(Method(
        f"diloco-sparse-k{_votes}-h{_rounds}",
        f"DiLoCo: {_rounds} local AdamW steps, the pseudo-gradient sent as sparse momentum votes ({_votes} per 256), {_SPARSE_OUTER}",
        replace(_VOTES, per_chunk=_votes), local_steps=_rounds, **_SPARSE_ROUNDS,
    ))
register(Method(
    "diloco-sparse-k4-h5-lean",
    "diloco-sparse-k4-h5 in AdamW's memory: inner Adam with a bf16 first moment and a factored second moment "
    "(Adafactor), the vote momentum in bf16",
    replace(_VOTES, per_chunk=4, momentum_dtype="bf16"), "lean_adamw", local_steps=5, **_SPARSE_ROUNDS,
))
register(Method(
    "diloco-sparse-k4-h5-lean-bf16-start",
    "diloco-sparse-k4-h5-lean with each matrix's round start kept in bf16 (the outer step rounded stochastically "
    "with a shared key): three quarters of AdamW's memory",
    replace(_VOTES, per_chunk=4, momentum_dtype="bf16"), "lean_adamw", local_steps=5, round_start="bf16", **_SPARSE_ROUNDS,
))
_OWNERS = "votes summed by chunk owners (all_to_all), which keep the {} strongest per 256 and all_gather them"
for _keep, _note in ((16, "the default's result up to 4 workers"), (8, "half the kept bytes")):
    register(Method(
        f"diloco-owners-k4-keep{_keep}-h5",
        f"diloco-sparse-k4-h5 with its {_OWNERS.format(_keep)}: a worker's bytes stay flat as workers are added; {_note}",
        replace(_VOTES, per_chunk=4, vote_reduction="owners", owner_keep=_keep), local_steps=5, **_SPARSE_ROUNDS,
    ))
_OVERLAPPED = dict(_SPARSE_ROUNDS, engine="overlapped_rounds")
register(Method(
    "diloco-sparse-k4-h5-overlap",
    "diloco-sparse-k4-h5 with each round's exchange running behind the next round's local steps "
    "(its outer step lands one round late; every 10 rounds replicas agree)",
    replace(_VOTES, per_chunk=4), local_steps=5, **_OVERLAPPED,
))
register(Method(
    "diloco-sparse-k4-h5-overlap-eager",
    "diloco-sparse-k4-h5-overlap whose worker, while the exchange is in flight, starts its next round from the "
    "outer step of its own votes, corrected to the mean's when it arrives (eager updates)",
    replace(_VOTES, per_chunk=4), local_steps=5, eager=True, **_OVERLAPPED,
))
register(Method("ddp-hook", "torch DDP + disttrain_hook (seeded basis r=8, int8, error feedback)", replace(_SEEDED, payload="int8"), engine="ddp_hook"))

_FEDAVG = dict(engine="local_steps", local_steps=10, outer_lr=1.0, outer_momentum=0.0)
register(Method("fedavg-h10", "FedAvg: 10 local AdamW steps, the fp32 pseudo-gradients averaged and applied as they are", CompressionSpec(basis="dense"), **_FEDAVG))
register(Method("fedavg-int8-h10", "FedAvg, the pseudo-gradient int8 (every tensor, per-row scales) with error feedback", replace(_PSEUDO_INT8, quantize_small=True), **_FEDAVG))
register(Method("fedavg-seeded-int8-h10", "FedAvg, pseudo-gradient in a fresh seeded basis r=4 every round (0 basis bytes), everything int8, error feedback", replace(_SEEDED, rank=4, payload="int8", quantize_small=True), **_FEDAVG))
register(Method("fedavg-subspace-int8-h10", "FedAvg, local steps inside a fresh seeded rank-4 subspace each round (frozen-A LoRA), coefficients int8 with error feedback", replace(_SEEDED, rank=4, payload="int8", quantize_small=True), "projected_adamw", galore_scale=128.0, **_FEDAVG))
register(Method(
    "fedavg-sign-1in32-h10",
    "federated rounds of 10 local AdamW steps, the pseudo-gradient's Lion-style momentum sign voted on a seeded "
    "rotating 1 in 32 coordinates (one bit each, no positions: about 1000x fewer bytes than fedavg-h10), outer SGD "
    "lr 0.03 following the schedule",
    CompressionSpec(basis="sign_votes", error_feedback=False, vote_every=32), engine="local_steps", local_steps=10,
    lr=3e-4, outer_lr=0.03, outer_momentum=0.0, outer_lr_scheduled=True,
))
_SUBSPACE_ROUNDS = replace(_SEEDED, rank=4)
register(Method(
    "fedavg-subspace-votes-k1-h13",
    "fedavg-votes-k1-h13 with its local steps inside a fresh seeded rank-4 subspace each round (Adam moments "
    "r x n, as GaLore), the round update then voted",
    replace(_VOTES, per_chunk=1), "projected_adamw", engine="local_steps", local_steps=13, lr=3e-4, outer_lr=0.1,
    outer_momentum=0.0, outer_lr_scheduled=True, galore_scale=128.0, local_subspace=_SUBSPACE_ROUNDS,
))
register(Method(
    "fedavg-votes-k1-h13",
    "federated fine-tuning rounds of 13 local AdamW steps, the pseudo-gradient sent as 1 sparse momentum vote per 256 "
    "values (1.25 bytes), outer SGD lr 0.1 following the schedule: about 1000x fewer bytes than fedavg-h10",
    replace(_VOTES, per_chunk=1), engine="local_steps", local_steps=13, lr=3e-4, outer_lr=0.1, outer_momentum=0.0,
    outer_lr_scheduled=True,
))
register(Method("zo-1byte", "shared-seed zeroth-order SPSA: two forward passes, no backward, one int8 byte per worker per step", engine="zeroth_order"))

DEFAULT_METHOD = "diloco-sparse-k4-h5"  # the convergence study's winner (docs/convergence.md)
# The best method of the study that exchanges every step and hands the user's own optimizer a
# reconstructed gradient (for jobs that cannot take local steps).
DEFAULT_PER_STEP_METHOD = "power-int4-r16"
DEFAULT_FEDERATED_METHOD = "fedavg-votes-k1-h13"  # the federated study's best at about 1000x (docs/federated.md)
# The default's rounds, votes and bytes in three quarters of AdamW's memory (docs/convergence.md#memory).
MEMORY_LEAN_METHOD = "diloco-sparse-k4-h5-lean-bf16-start"
