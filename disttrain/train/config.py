"""Config dataclasses for a training run: one section per concern, each field with its one-line help."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from disttrain.comm.allreduce import check_rank_fits
from disttrain.comm.layout import NODE_MODES, Inner
from disttrain.data.corpus import DataConfig
from disttrain.federated.config import FederatedConfig
from disttrain.federated.zeroth_order import ZOConfig
from disttrain.methods import DEFAULT_FEDERATED_METHOD, DEFAULT_METHOD, PROJECTED_OPTIMIZERS, Method, get_method, with_overrides
from disttrain.models.gpt import GPT, GPTConfig
from disttrain.models.lora import LoraConfig
from disttrain.options import option, section


@dataclass(frozen=True)
class OptimConfig:
    lr: float | None = option(None, "peak learning rate (default: the method's own, see `disttrain methods`)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    warmup_steps: int = option(20, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this share of the peak lr")
    galore_scale: float | None = option(None, "ProjectedAdamW's update scale (default: the method's own)")

    def validate(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


# Fields that do not change the maths: a checkpoint may be resumed with other values of them.
RUNTIME_FIELDS = (
    "eval_every", "digest_every", "checkpoint_dir", "checkpoint_every", "link_mbit", "overlap", "stop_at", "device",
    "round_quorum", "round_deadline_s",
)
Mode = Literal["lm", "federated"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16"]
RUN, METHOD, ROUNDS = "run", "method and compression", "local-step rounds (quorum and deadline)"  # groups of flags


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Every worker must start with the same one."""

    mode: Mode = option("lm", "lm: pretrain the small GPT on the bundled text; federated: fine-tune the pretrained classifier", RUN)
    task: str | None = option(
        None, "your own task: path/to/file.py:function or module:function returning the model and its data "
        "(see docs/own-model.md)", RUN,
    )
    method: str | None = option(None, "how updates are exchanged; see `disttrain methods` (default: the mode's own)", METHOD)
    rank: int | None = option(None, "rank of the method's low-rank basis (default: the method's own)", METHOD)
    refresh_every: int | None = option(None, "steps between basis refreshes of an SVD, seeded or sparse-rows basis", METHOD)
    votes_per_chunk: int | None = option(None, "entries of every 256 a sparse-vote method sends (default: the method's own)", METHOD)
    local_steps: int | None = option(None, "round length H of a local-step method (diloco-*, fedavg-*)", METHOD)
    outer_lr: float | None = option(None, "learning rate of a local-step method's outer step (default: the method's own)", METHOD)
    steps: int = option(300, "training steps (the learning-rate schedule spans them)", RUN)
    stop_at: int | None = option(None, "stop after this step; the schedule still spans --steps", RUN)
    round_quorum: float = option(1.0, "a local-step round closes once this share of the workers has finished it", ROUNDS)
    round_deadline_s: float | None = option(None, "... or this many seconds after the first finished; late work is dropped", ROUNDS)
    seed: int = option(0, "seeds the model, the data order and every shared random basis", RUN)
    eval_every: int = option(50, "steps between validation evaluations", RUN)
    digest_every: int = option(25, "steps between replica checks (a SHA-256 of every parameter, compared across workers)", RUN)
    checkpoint_dir: str | None = option(None, "directory for checkpoints; a run resumes from one found there", RUN)
    checkpoint_every: int = option(0, "steps between checkpoints (0: none)", RUN)
    link_mbit: float | None = option(None, "emulate a slow uplink of this many Mbit/s by pacing every collective", METHOD)
    overlap: bool = option(True, "launch each bucket's collective during backward", METHOD)
    inner: Inner = option(
        "auto", "who a worker is: flat (every process), ddp (a node of several processes: torch DDP inside, the exchange "
        "between nodes), fsdp (the same with FSDP2 inside: each process holds a shard of the model), auto (ddp when the "
        "job spans several nodes of several processes each)", METHOD,
    )
    device: Device = option("auto", "auto: this process's GPU if torch sees one, else the CPU", RUN)
    precision: Precision = option("fp32", "bf16: forward and backward under autocast; weights, bytes and optimizer stay fp32", RUN)
    model: GPTConfig = section(GPTConfig, "model: the small GPT of --mode lm")
    data: DataConfig = section(DataConfig, "data: the text corpus of --mode lm")
    optim: OptimConfig = section(OptimConfig, "optimizer and learning-rate schedule")
    federated: FederatedConfig = section(FederatedConfig, "federated: the classifier fine-tune of --mode federated")
    zeroth_order: ZOConfig = section(ZOConfig, "zeroth-order steps (method zo-1byte)")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters: only they (and the head) are trained and exchanged")

    @property
    def method_name(self) -> str:
        """The method to run: the one named, or the mode's default."""
        if self.method is not None:
            return self.method
        return DEFAULT_FEDERATED_METHOD if self.mode == "federated" else DEFAULT_METHOD

    @property
    def peak_lr(self) -> float:
        """The schedule's peak learning rate: --optim.lr, or the method's own."""
        return get_method(self.method_name).lr if self.optim.lr is None else self.optim.lr

    def validate(self) -> None:
        check_literals(self)
        method = get_method(self.method_name)
        for name in ("rank", "refresh_every", "votes_per_chunk", "local_steps", "outer_lr"):
            if getattr(self, name) is not None and name not in method.overrides:
                raise ValueError(f"--{flag_name(name)} does not apply to {method.name!r}: {method.why_not(name)}")
        if self.mode == "federated" and not method.traits.federated:
            raise ValueError(
                f"federated mode trains in rounds, and {self.method_name!r} exchanges gradients every step: "
                f"pick a fedavg-*, diloco-* or zo-* method, or drop --method for {DEFAULT_FEDERATED_METHOD!r}"
            )
        if self.lora.rank and method.optimizer in PROJECTED_OPTIMIZERS:
            raise ValueError(
                f"--lora.rank trains low-rank adapters, and {self.method_name!r} projects its updates onto a low-rank basis "
                "too: pick a method without a projected optimizer (e.g. fedavg-h10, diloco-sparse-k4-h10) or drop --lora.rank"
            )
        if self.inner in NODE_MODES and not method.makes_nodes:
            raise ValueError(f"--inner {self.inner} cannot run {self.method_name!r}: {method.why_no_nodes()}, or --inner flat")
        if self.inner in NODE_MODES and (self.round_quorum < 1 or self.round_deadline_s is not None):
            raise ValueError("round-quorum and round-deadline-s need every process to be a worker: drop them or use --inner flat")
        if (self.round_quorum < 1 or self.round_deadline_s is not None) and not method.traits.closes_early:
            raise ValueError(
                f"round-quorum and round-deadline-s close local-step rounds early, and {self.method_name!r} has no rounds "
                "that can close early: drop them or pick a fedavg-* or diloco-* method without overlap"
            )
        if not 0 < self.round_quorum <= 1:
            raise ValueError(f"round-quorum is a share of the workers in (0, 1], got {self.round_quorum}")
        if self.round_deadline_s is not None and self.round_deadline_s <= 0:
            raise ValueError(f"round-deadline-s must be > 0 seconds (or unset), got {self.round_deadline_s}")
        for name in ("rank", "refresh_every", "votes_per_chunk", "local_steps", "steps", "eval_every", "digest_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{flag_name(name)} must be >= 1, got {value}")
        if self.votes_per_chunk is not None and self.votes_per_chunk > 256:
            raise ValueError(f"--votes-per-chunk counts entries of a chunk of 256 and must be <= 256, got {self.votes_per_chunk}")
        if self.outer_lr is not None and not self.outer_lr > 0:
            raise ValueError(f"--outer-lr must be > 0, got {self.outer_lr}")
        if self.stop_at is not None and self.stop_at < 0:
            raise ValueError(f"--stop-at must be >= 0, got {self.stop_at}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every needs --checkpoint-dir: the directory the checkpoints go to")
        if self.link_mbit is not None and not self.link_mbit > 0:
            raise ValueError(f"--link-mbit is a rate in Mbit/s and must be > 0, got {self.link_mbit}")
        if self.data.block_size > self.model.block_size:
            raise ValueError(
                f"data.block-size ({self.data.block_size}) exceeds model.block-size ({self.model.block_size})"
            )
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.federated.validate()
        self.lora.validate()
        if self.task is not None:
            from disttrain.train.task import load_task_function  # task.py imports this module

            load_task_function(self.task)  # the model is built, and its rank checked, in the workers
        elif self.mode == "lm":
            check_rank_fits(self.resolved_method().compression, model_shapes(self.model))
            with torch.device("meta"):
                self.lora.check(GPT(self.model))

    def resolved_method(self) -> Method:
        """The method with this config's overrides (rank, refresh interval, votes per chunk, round length, outer lr) applied."""
        method = with_overrides(
            get_method(self.method_name), rank=self.rank, refresh_every=self.refresh_every, per_chunk=self.votes_per_chunk
        )
        rounds = {name: value for name in ("local_steps", "outer_lr") if (value := getattr(self, name)) is not None}
        return replace(method, **rounds) if rounds else method

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, include_runtime: bool = True) -> str:
        """A hash of the config. Workers must agree on all of it; a checkpoint only on the fields
        that change the maths (not where checkpoints go, how often to evaluate, link pacing)."""
        values = self.to_dict()
        if not include_runtime:
            for name in RUNTIME_FIELDS:
                values.pop(name)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def flag_name(field_name: str) -> str:
    """The command-line spelling of a config field: dashes, not underscores."""
    return field_name.replace("_", "-")


def check_literals(config: Any, prefix: str = "") -> None:
    """Every field typed as a Literal, in every section, holds one of its values."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_literals(value, f"{prefix}{f.name}.")
            continue
        allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        if allowed and value not in allowed:
            choices = ", ".join(map(str, allowed))
            raise ValueError(f"--{flag_name(prefix + f.name)} must be one of {choices}, got {value!r}")


def model_shapes(config: GPTConfig) -> list[torch.Size]:
    """The parameter shapes of the small GPT, without allocating it."""
    with torch.device("meta"):
        return [p.shape for p in GPT(config).parameters()]
