"""Config flags: one per field, with a description, dashes canonical, the same parser for `disttrain
train` and the workers, and docs/configuration.md generated from it."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from disttrain import cli, config_docs
from disttrain.launcher import worker
from disttrain.train.config import TrainConfig
from disttrain.train.flags import config_from_args

REPO = Path(__file__).resolve().parent.parent


def config_fields() -> list[tuple[str, dataclasses.Field, object]]:
    """(flag, field, default) for every leaf field of TrainConfig."""
    found = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(TrainConfig(), f.name)
        if dataclasses.is_dataclass(value):
            found += [(f"--{f.name}.{g.name}".replace("_", "-"), g, getattr(value, g.name)) for g in dataclasses.fields(value)]
        else:
            found.append((f"--{f.name}".replace("_", "-"), f, value))
    return found


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: action for action in parser._actions for name in action.option_strings}


def train_parser() -> argparse.ArgumentParser:
    return config_docs._subcommands(cli.build_parser())["train"]


@pytest.mark.parametrize("flag, field, default", config_fields(), ids=[f for f, _, _ in config_fields()])
def test_every_config_field_has_a_described_flag_that_shows_its_default(flag, field, default):
    action = options(worker.build_parser())[flag]
    assert field.metadata["help"] and action.help.startswith(field.metadata["help"].replace("%", "%%"))
    assert "default:" in action.help


def test_every_default_given_as_a_flag_gives_the_default_config():
    argv = [token for flag, _, default in config_fields() if default is not None for token in (flag, str(default))]
    assert config_from_args(worker.build_parser().parse_args(argv)) == TrainConfig()


def test_the_underscore_spelling_is_an_alias_of_the_dashed_flag():
    parser = worker.build_parser()
    dashed = config_from_args(parser.parse_args(["--eval-every", "7", "--model.n-layer", "2"]))
    underscored = config_from_args(parser.parse_args(["--eval_every", "7", "--model.n_layer=2"]))
    assert dashed == underscored and dashed.eval_every == 7 and dashed.model.n_layer == 2


def test_disttrain_train_takes_the_workers_flags_and_its_launch_flags():
    assert set(options(train_parser())) == set(options(worker.build_parser())) | set(cli.LAUNCH_FLAGS)


def test_flags_are_grouped_by_concern():
    titles = {group.title for group in train_parser()._action_groups}
    expected = {"run", "method and compression", "process", "optimizer and learning-rate schedule"}
    assert expected <= titles
    assert any(title.startswith("elastic membership") for title in titles)
    assert any(title.startswith("federated") for title in titles)


def test_configuration_doc_is_the_generated_one():
    assert (REPO / "docs" / "configuration.md").read_text() == config_docs.render(), (
        "regenerate it: python -m disttrain.config_docs > docs/configuration.md"
    )


def test_the_example_config_is_valid():
    config = config_from_args(worker.build_parser().parse_args(["--config", str(REPO / "examples" / "run.toml")]))
    assert config.model.n_layer == 2 and config.eval_every == 25 and config.link_mbit == 20.0


def test_a_flag_overrides_one_key_of_a_dashed_config_table_and_keeps_the_others(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("eval-every = 7\n[zeroth-order]\neps = 0.5\n")
    args = worker.build_parser().parse_args(["--config", str(config), "--zeroth-order.lr", "1e-3"])
    loaded = config_from_args(args)
    assert loaded.zeroth_order.eps == 0.5 and loaded.zeroth_order.lr == 1e-3 and loaded.eval_every == 7
