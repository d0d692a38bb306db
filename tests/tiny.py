"""A tiny model and data config that trains in seconds, for multi-process tests."""

from disttrain.data.corpus import DataConfig
from disttrain.models.gpt import GPTConfig
from disttrain.train.config import OptimConfig, TrainConfig

TINY_MODEL = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=64)
TINY_DATA = DataConfig(batch_size=4, block_size=32, val_batches=2)
TINY_OPTIM = OptimConfig(lr=3e-3, warmup_steps=2)
PER_STEP_METHOD = "svd-int8-reconstruct"  # tests of per-step behaviour pin it: the default method has local steps


def tiny_config(**overrides) -> TrainConfig:
    defaults = dict(
        method=PER_STEP_METHOD, steps=8, eval_every=4, digest_every=4, model=TINY_MODEL, data=TINY_DATA, optim=TINY_OPTIM, rank=4
    )
    defaults.update(overrides)
    return TrainConfig(**defaults)

# The same tiny setup as command-line flags, for tests that start real worker processes.
TINY_FLAGS = [
    "--model.n_layer", "1", "--model.n_embd", "64", "--model.n_head", "2", "--model.block_size", "32",
    "--data.block_size", "32", "--data.batch_size", "4", "--data.val_batches", "2", "--rank", "4",
    "--optim.warmup_steps", "2",
]
TINY_PER_STEP_FLAGS = [*TINY_FLAGS, "--method", PER_STEP_METHOD]
