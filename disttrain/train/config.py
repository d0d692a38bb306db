"""Config dataclasses for a training run, and their command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disttrain.data.corpus import DataConfig
from disttrain.federated.config import FederatedConfig
from disttrain.federated.zeroth_order import ZOConfig
from disttrain.methods import DEFAULT_FEDERATED_METHOD, DEFAULT_METHOD, get_method
from disttrain.models.gpt import GPTConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float | None = None  # peak learning rate; None: the method's own (Method.lr)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    galore_scale: float | None = None  # ProjectedAdamW's update scale; None: the method's own

    def validate(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


RUNTIME_FIELDS = (
    "eval_every", "digest_every", "checkpoint_dir", "checkpoint_every", "link_mbit", "overlap", "stop_at", "device",
    "round_quorum", "round_deadline_s",
)
PRECISIONS = ("fp32", "bf16")
MODES = ("lm", "federated")
ROUND_ENGINES = ("local_steps", "zeroth_order")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Every worker must start with the same one."""

    mode: str = "lm"  # lm: pretrain the small GPT on the bundled text; federated: fine-tune a pretrained classifier
    method: str | None = None  # None: the mode's default method
    rank: int | None = None  # overrides the method's projection rank
    refresh_every: int | None = None  # overrides the method's basis refresh interval
    local_steps: int | None = None  # overrides a local-step method's round length H
    steps: int = 300
    stop_at: int | None = None  # stop after this step (the schedule still spans `steps`)
    round_quorum: float = 1.0  # a local-step round closes once this share of the workers has finished it
    round_deadline_s: float | None = None  # ... or this long after the first finished; late work is dropped
    seed: int = 0
    eval_every: int = 50
    digest_every: int = 25
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    link_mbit: float | None = None  # emulate a slow uplink by pacing collectives
    overlap: bool = True
    device: str = "auto"  # auto: this process's GPU if torch sees one (NCCL), else the CPU (Gloo)
    precision: str = "fp32"  # bf16: forward and backward under bf16 autocast; weights, bytes and optimizer stay fp32
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    zeroth_order: ZOConfig = field(default_factory=ZOConfig)

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
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        engine = get_method(self.method_name).engine
        if self.local_steps is not None and engine != "local_steps":
            raise ValueError(
                f"local_steps applies to local-step methods only, and {self.method_name!r} exchanges every step; "
                "drop --local_steps or pick a diloco-* or fedavg-* method (see `disttrain methods`)"
            )
        if self.mode == "federated" and engine not in ROUND_ENGINES:
            raise ValueError(
                f"federated mode trains in rounds, and {self.method_name!r} exchanges gradients every step: "
                f"pick a fedavg-*, diloco-* or zo-* method, or drop --method for {DEFAULT_FEDERATED_METHOD!r}"
            )
        if (self.round_quorum < 1 or self.round_deadline_s is not None) and engine != "local_steps":
            raise ValueError(
                f"round_quorum and round_deadline_s close local-step rounds, and {self.method_name!r} has none: "
                "drop them or pick a fedavg-* or diloco-* method"
            )
        if not 0 < self.round_quorum <= 1:
            raise ValueError(f"round_quorum is a share of the workers in (0, 1], got {self.round_quorum}")
        if self.round_deadline_s is not None and self.round_deadline_s <= 0:
            raise ValueError(f"round_deadline_s must be > 0 seconds (or unset), got {self.round_deadline_s}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_every < 1 or self.digest_every < 1:
            raise ValueError("eval_every and digest_every must be >= 1")
        if self.data.block_size > self.model.block_size:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) exceeds model.block_size ({self.model.block_size})"
            )
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.federated.validate()

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


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Builds a (nested) config dataclass from a dict, naming any unknown key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key {key!r} for {cls.__name__}; known keys: {', '.join(known)}")
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING else None
        kwargs[key] = from_dict(type(default), value) if dataclasses.is_dataclass(default) else value
    return cls(**kwargs)


def load_config_file(path: str) -> dict[str, Any]:
    """A TOML or JSON file holding (some of) TrainConfig's fields."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    text = file.read_text()
    return tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)


def _flag_type(value: Any, annotation: str):
    if isinstance(value, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if "float" in annotation:
        return float
    if "int" in annotation:
        return int
    return str


def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig, prefix: str = "") -> None:
    """One --flag per config field; nested dataclasses become --model.n_layer and so on."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            add_config_flags(parser, type(value), f"{prefix}{f.name}.")
            continue
        parser.add_argument(
            f"--{prefix}{f.name}",
            dest=f"cfg:{prefix}{f.name}",
            metavar=f.name.upper(),
            type=_flag_type(value, str(f.type)),
            default=None,
            help=f"(default: {value})",
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then explicit flags."""
    values: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            *parents, leaf = key[4:].split(".")
            node = values
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    config = from_dict(TrainConfig, values)
    config.validate()
    return config
