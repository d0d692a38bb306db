"""LoRA adapters: the model starts unchanged, only adapters and the named head train, replicas draw
the same adapters, and federated rounds send only the adapters and the head."""

import pytest
import torch
from distributed import run_workers
from test_federated import federated_config
from torch import nn

from disttrain.models.lora import LoraConfig, LoRALinear, add_lora
from disttrain.train.config import TrainConfig
from disttrain.train.replica import parameter_digest
from disttrain.train.trainer import Trainer


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_an_adapted_model_computes_what_it_did_before_training():
    model, x = Classifier(), torch.randn(5, 6)
    before = model(x)
    add_lora(model, rank=2)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_only_the_adapters_and_the_head_are_trainable():
    model = Classifier()
    assert add_lora(model, rank=2) == ["encoder.0", "encoder.2"]
    assert trainable_names(model) == {
        "encoder.0.lora_a", "encoder.0.lora_b", "encoder.2.lora_a", "encoder.2.lora_b", "classifier.weight", "classifier.bias",
    }
    assert isinstance(model.classifier, nn.Linear) and isinstance(model.encoder[0], LoRALinear)


def test_training_moves_the_adapters_and_leaves_the_base_weights_alone():
    model = Classifier()
    add_lora(model, rank=2)
    base = model.encoder[0].base.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
    assert torch.equal(model.encoder[0].base.weight, base)
    assert model.encoder[0].lora_b.abs().sum() > 0


def test_replicas_with_the_same_seed_draw_the_same_adapters_and_other_seeds_others():
    digests = []
    for seed in (0, 0, 1):
        model = Classifier()
        add_lora(model, rank=2, seed=seed)
        digests.append(parameter_digest(model))
    assert digests[0] == digests[1] != digests[2]


class PooledClassifier(Classifier):
    """A Hugging Face-style classifier: a pooler between the encoder and the head."""

    def __init__(self):
        super().__init__()
        self.pooler = nn.Sequential(nn.Linear(8, 8), nn.Tanh())


def test_auto_trains_in_full_every_usual_head_module_the_model_has_the_pooler_included():
    model = PooledClassifier()
    assert add_lora(model, rank=2) == ["encoder.0", "encoder.2"]
    whole = {name for name, p in model.named_parameters() if p.requires_grad and "lora" not in name}
    assert whole == {"classifier.weight", "classifier.bias", "pooler.0.weight", "pooler.0.bias"}


def test_auto_on_a_model_without_a_usual_head_asks_to_name_one():
    with pytest.raises(ValueError, match="auto: the model has none of the usual head modules.*or '' for adapters only"):
        add_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)


def test_a_head_the_model_does_not_have_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"train-whole.*\['head'\]"):
        add_lora(Classifier(), rank=2, train_whole=("head",))


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(nn.Sequential(nn.Conv1d(1, 1, 3)), rank=2, train_whole=())


def test_lora_with_a_projected_optimizer_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="lora.rank.*fedavg-h10"):
        TrainConfig(mode="federated", method="fedavg-subspace-int8-h10", lora=LoraConfig(rank=4)).validate()


@pytest.mark.parametrize("bad", [{"rank": -1}, {"alpha": 0.0}])
def test_lora_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match="lora"):
        LoraConfig(**bad).validate()


def fine_tune_with_lora(rank: int, world: int) -> dict:
    trainer = Trainer(federated_config(method="fedavg-h10", lora=LoraConfig(rank=4)), progress=False)
    sent = {name: p.numel() for name, p in trainer.model.named_parameters() if p.requires_grad}
    initial_loss, _ = trainer.evaluate()
    summary = trainer.run()
    return {"digest": parameter_digest(trainer.model), "summary": summary, "initial_loss": initial_loss, "sent": sent}


def test_federated_lora_rounds_send_only_the_adapters_and_the_head_and_keep_replicas_identical():
    results = run_workers(fine_tune_with_lora, 2)
    summary, sent = results[0]["summary"], results[0]["sent"]
    # The head that train-whole "auto" picks on MiniLM: the classifier and the pooler under it.
    assert all(name.endswith(("lora_a", "lora_b")) or name.startswith(("classifier.", "bert.pooler.")) for name in sent)
    assert any(name.startswith("bert.pooler.") for name in sent)
    rounds = 24 // 4
    assert summary.total_bytes == rounds * 4 * sum(sent.values())  # fp32 FedAvg of the trainable tensors, every round
    assert len({r["digest"] for r in results}) == 1 and summary.replicas_identical
    assert summary.history[-1].val_loss < results[0]["initial_loss"] - 0.05
