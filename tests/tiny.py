"""A tiny model and data config that trains in seconds, for multi-process tests."""

from dataclasses import replace

from disttrain.data.corpus import DataConfig
from disttrain.methods import get_method
from disttrain.models.gpt import GPTConfig
from disttrain.train.config import OptimConfig, TrainConfig

TINY_MODEL = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=64)
TINY_DATA = DataConfig(batch_size=4, block_size=32, val_batches=2)
TINY_OPTIM = OptimConfig(lr=3e-3, warmup_steps=2)
PER_STEP_METHOD = "svd-int8-reconstruct"  # tests of per-step behaviour pin it: the default method has local steps


def tiny_config(**overrides) -> TrainConfig:
    """The tiny run; a method with a low-rank basis gets rank 4 unless ``overrides`` say otherwise."""
    defaults = dict(method=PER_STEP_METHOD, steps=8, eval_every=4, digest_every=4, model=TINY_MODEL, data=TINY_DATA, optim=TINY_OPTIM)
    defaults.update(overrides)
    config = TrainConfig(**defaults)
    if "rank" not in overrides and "rank" in get_method(config.method_name).overrides:
        config = replace(config, rank=4)
    return config


# The same tiny setup as command-line flags, for tests that start real worker processes.
TINY_FLAGS = [
    "--model.n-layer", "1", "--model.n-embd", "64", "--model.n-head", "2", "--model.block-size", "32",
    "--data.block-size", "32", "--data.batch-size", "4", "--data.val-batches", "2", "--optim.warmup-steps", "2",
]
TINY_PER_STEP_FLAGS = [*TINY_FLAGS, "--method", PER_STEP_METHOD, "--rank", "4"]
