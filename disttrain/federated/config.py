"""Settings of a federated fine-tuning run: the pretrained model, the labelled data and its split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from disttrain.data.verses import LabelKind
from disttrain.options import option

Partition = Literal["dirichlet", "iid"]


@dataclass(frozen=True)
class FederatedConfig:
    """``clients`` data shards are cut from the training verses; worker ``rank`` trains on shard
    ``rank % clients``. ``layers`` keeps the first layers of the pretrained encoder (6 = all)."""

    label: LabelKind = option("section", "what the classifier predicts of a verse: testament, section or book")
    clients: int = option(4, "data shards cut from the training verses; worker r trains on shard r % clients")
    partition: Partition = option("dirichlet", "dirichlet: label-skewed shards (non-IID); iid: uniform shards")
    alpha: float = option(0.5, "Dirichlet concentration: smaller is more skewed")
    max_length: int = option(48, "tokens per verse after truncation")
    batch_size: int = option(16, "verses per worker per step")
    eval_samples: int = option(512, "held-out verses per evaluation")
    layers: int = option(6, "first layers of the pretrained encoder to keep (6 = all)")
    freeze_embeddings: bool = option(True, "keep the pretrained embeddings fixed")

    def validate(self) -> None:
        # label and partition are Literals: TrainConfig.validate checks them with every other closed set
        if not self.alpha > 0:
            raise ValueError(f"federated.alpha must be > 0 (smaller = more skewed), got {self.alpha}")
        for name in ("clients", "max_length", "batch_size", "eval_samples", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"federated.{name} must be >= 1, got {getattr(self, name)}")
