"""Settings of a federated fine-tuning run: the pretrained model, the labelled data and its split."""

from __future__ import annotations

from dataclasses import dataclass

from disttrain.data.verses import LABEL_KINDS

PARTITIONS = ("dirichlet", "iid")


@dataclass(frozen=True)
class FederatedConfig:
    """``clients`` data shards are cut from the training verses; worker ``rank`` trains on shard
    ``rank % clients``. ``layers`` keeps the first layers of the pretrained encoder (6 = all)."""

    label: str = "section"
    clients: int = 4
    partition: str = "dirichlet"
    alpha: float = 0.5
    max_length: int = 48
    batch_size: int = 16
    eval_samples: int = 512
    layers: int = 6
    freeze_embeddings: bool = True

    def validate(self) -> None:
        if self.label not in LABEL_KINDS:
            raise ValueError(f"unknown federated.label {self.label!r}; choose one of {', '.join(LABEL_KINDS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown federated.partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        if not self.alpha > 0:
            raise ValueError(f"federated.alpha must be > 0 (smaller = more skewed), got {self.alpha}")
        for name in ("clients", "max_length", "batch_size", "eval_samples", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"federated.{name} must be >= 1, got {getattr(self, name)}")
