"""Fine-tune the bundled all-MiniLM-L6-v2 to tell which section of the Bible a verse is from,
with the Hugging Face Trainer, its gradients exchanged compressed by disttrain. Offline.

    torchrun --nproc-per-node 2 examples/hf_trainer_minilm.py [--method power-int4-r16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import EvalPrediction, Trainer, TrainingArguments, set_seed  # noqa: E402

from disttrain.data.verses import LABEL_KINDS, VerseConfig, split_verses  # noqa: E402
from disttrain.integrations.hf import compress_gradients  # noqa: E402
from disttrain.methods import DEFAULT_PER_STEP_METHOD  # noqa: E402
from disttrain.models.pretrained import encode, load_classifier  # noqa: E402

log = logging.getLogger("hf_trainer_minilm")


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default=DEFAULT_PER_STEP_METHOD)
    parser.add_argument("--label", choices=LABEL_KINDS, default="section")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per verse")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--test-size", type=int, default=512, help="held-out verses to score")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = parse_args()
    set_seed(options.seed)
    verses = split_verses(VerseConfig(label=options.label, seed=options.seed))
    tokenizer, model = load_classifier(verses.num_labels)
    stride = max(1, len(verses.test) // options.test_size)
    test = encode(tokenizer, verses.test[::stride][: options.test_size], options.max_length)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_trainer_minilm-"),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=options.lr,
        warmup_steps=options.steps // 10,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=options.steps,
        eval_on_start=True,  # not trainer.evaluate() before train(): the model would never be wrapped in DDP
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        seed=options.seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encode(tokenizer, verses.train, options.max_length),
        eval_dataset=test,
        compute_metrics=accuracy,
    )
    exchange = compress_gradients(trainer, options.method)
    trainer.train()
    before, after = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    if trainer.is_world_process_zero():
        summary = {
            "method": options.method,
            "workers": args.world_size,
            "steps": trainer.state.global_step,
            "labels": verses.num_labels,
            "accuracy_before": round(before, 3),
            "accuracy_after": round(after, 3),
            "bytes_sent": exchange.bytes_sent,
            "dense_bytes": exchange.dense_bytes,
            "compression_ratio": round(exchange.dense_bytes / max(exchange.bytes_sent, 1), 1),
        }
        log.info(json.dumps(summary))
    trainer.accelerator.end_training()  # destroys the process group, so the workers exit cleanly


if __name__ == "__main__":
    main()
