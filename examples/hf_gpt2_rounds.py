"""Train a small GPT-2 on the bundled King James text with an unmodified Hugging Face Trainer and
disttrain's local-step default: Trainer's AdamW steps locally, every 5 steps one compressed exchange.

    torchrun --nproc-per-node 2 examples/hf_gpt2_rounds.py [--steps 60] [--method diloco-sparse-k4-h5]

The model is built from a GPT2Config (nothing is downloaded) and reads byte-level ids, 64 bytes a
sample; Trainer's data loader gives each rank its own shard. ``--method ddp`` runs the same Trainer
without disttrain (DDP's dense all-reduce every step) for the baseline. Rank 0 prints one JSON line;
the script fails if the replicas end different.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from importlib import resources

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

from disttrain.integrations.hf import compress_gradients
from disttrain.methods import DEFAULT_METHOD, get_method
from disttrain.train.replica import parameter_digest

BLOCK = 64  # bytes a sample, the model's context
LOG_EVERY = 5  # steps a logged training loss averages over


class ByteBlocks(torch.utils.data.Dataset):
    """The King James Bible that ships inside the package, cut into blocks of BLOCK byte ids."""

    def __init__(self):
        packed = resources.files("disttrain.data").joinpath("kjv.txt.gz").read_bytes()
        text = torch.frombuffer(bytearray(gzip.decompress(packed)), dtype=torch.uint8).long()
        self.blocks = text[: len(text) // BLOCK * BLOCK].view(-1, BLOCK)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}  # the model shifts the labels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default=DEFAULT_METHOD, help="a disttrain method that runs in Trainer, or ddp")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the method's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def replicas_identical(model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (a SHA-256 of them, gathered)."""
    digests: list[bytes | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, parameter_digest(model))
    return len(set(digests)) == 1


def main() -> None:
    options = parse_args()
    set_seed(options.seed)
    byte_ids = dict(vocab_size=256, bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is not a byte
    model = GPT2LMHeadModel(GPT2Config(n_positions=BLOCK, n_embd=128, n_layer=2, n_head=4, **byte_ids))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_gpt2_rounds-"),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr or get_method(options.method).lr,
        warmup_steps=options.steps // 10,
        logging_steps=LOG_EVERY,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        seed=options.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ByteBlocks())
    exchange = None if options.method == "ddp" else compress_gradients(trainer, options.method)
    trainer.train()

    steps = trainer.state.global_step
    dense_bytes = steps * sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    bytes_sent = dense_bytes if exchange is None else exchange.bytes_sent
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    identical = replicas_identical(model)
    if trainer.is_world_process_zero():
        summary = {
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "method": options.method,
            "workers": args.world_size,
            "steps": steps,
            "exchanges": steps if exchange is None else exchange.exchanges,
            "bytes_per_step": bytes_sent / steps,
            "dense_bytes_per_step": dense_bytes / steps,
            "compression_ratio": round(dense_bytes / max(bytes_sent, 1), 1),
            "replicas_identical": identical,
        }
        print(json.dumps(summary), flush=True)
    trainer.accelerator.end_training()  # destroys the process group, so the workers exit cleanly
    if not identical:
        raise SystemExit("replicas differ after training")


if __name__ == "__main__":
    main()
