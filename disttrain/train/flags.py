"""Command-line flags and config files for TrainConfig: one flag per field, grouped by section.

Dashes are the canonical spelling (``--eval-every``, ``--model.n-layer``); the underscore spelling
of a flag is accepted as an alias. Values come from the defaults, then a ``--config`` file, then
explicit flags, and are type-checked whichever way they came.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

from disttrain.options import group_of, help_of
from disttrain.train.config import TrainConfig, flag_name

CONFIG_DEST = "cfg:"  # argparse destinations of config flags start with this
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class ConfigFileError(ValueError):
    """A config file that cannot be read, parsed or matched to the config's fields."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (not the usage block), with exit status 2.
    Flags are never abbreviated: with a hundred of them, a prefix would match by accident."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Parses with the underscore spelling of every long flag taken as its dashed one."""
        return super().parse_known_args(canonical_flags(sys.argv[1:] if args is None else list(args)), namespace)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def canonical_flags(argv: list[str]) -> list[str]:
    """``--eval_every 5`` -> ``--eval-every 5``: the underscore spelling of any long flag is an alias."""
    spelled = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token.partition("=")
            token = name.replace("_", "-") + equals + value
        spelled.append(token)
    return spelled


def parse_bool(text: str) -> bool:
    """A strict boolean for flags: true/false, yes/no, on/off, 1/0."""
    word = text.lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _plain_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner
    return annotation


def _flag_parser(annotation: Any) -> tuple[Callable[[str], Any], tuple[Any, ...] | None]:
    """How a flag's text becomes the field's value, and its choices (for Literal fields)."""
    plain = _plain_type(annotation)
    if typing.get_origin(plain) is Literal:
        return str, typing.get_args(plain)
    if plain is bool:
        return parse_bool, None
    return plain, None


def _metavar(annotation: Any, choices: tuple[Any, ...] | None) -> str:
    if choices:
        return "{" + ",".join(choices) + "}"
    return {bool: "BOOL", int: "N", float: "X"}.get(_plain_type(annotation), "TEXT")


def _help_with_default(text: str, default: Any) -> str:
    """The help line with its default (unless it says its own), escaped for argparse's % formatting."""
    if "default:" not in text:
        text = f"{text} (default: {'unset' if default is None else default})"
    return text.replace("%", "%%")


def _add_flag(group: Any, f: dataclasses.Field, annotation: Any, default: Any, section: str = "") -> None:
    """The flag of one config field (``--section.field-name``)."""
    convert, choices = _flag_parser(annotation)
    prefix = f"{section}." if section else ""
    group.add_argument(
        f"--{flag_name(prefix + f.name)}",
        dest=f"{CONFIG_DEST}{prefix}{f.name}",
        metavar=_metavar(annotation, choices),
        type=convert,
        choices=choices,
        default=None,  # None: not given, so the config file or the field's default holds
        help=_help_with_default(help_of(f), default),
    )


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field: top-level fields in their named groups, each section in its own."""
    defaults, hints = TrainConfig(), typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    sections = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f, value))
            continue
        if group_of(f) not in groups:
            groups[group_of(f)] = parser.add_argument_group(group_of(f))
        _add_flag(groups[group_of(f)], f, hints[f.name], value)
    for section, value in sections:
        group = parser.add_argument_group(help_of(section))
        section_hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            _add_flag(group, f, section_hints[f.name], getattr(value, f.name), section.name)


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """The value of a config file entry, type-checked against the field (ints are accepted as floats)."""
    plain = _plain_type(annotation)
    if value is None and plain is not annotation:
        return None
    if typing.get_origin(plain) is Literal:
        if value not in typing.get_args(plain):
            raise ConfigFileError(f"{where} must be one of {', '.join(map(str, typing.get_args(plain)))}, got {value!r}")
        return value
    if plain is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if plain is int and isinstance(value, bool) or not isinstance(value, plain):
        raise ConfigFileError(f"{where} must be {plain.__name__}, got {value!r}")
    return value


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Builds a (nested) config dataclass from a dict, naming any unknown key or wrong type."""
    if not isinstance(values, dict):
        raise ConfigFileError(f"{where.rstrip('.') or 'the config'} must be a table of fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(flag_name(n) for n in fields)
            raise ConfigFileError(f"unknown config key {where + key!r} for {cls.__name__}; known keys: {known}")
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(type(default), value, f"{where}{key}.")
        else:
            kwargs[name] = _check_value(value, hints[name], f"{where}{key}")
    return cls(**kwargs)


def load_config_file(path: str) -> dict[str, Any]:
    """A TOML or JSON file holding (some of) TrainConfig's fields; errors name the file, format and line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigFileError(f"config file {path!r} not found")
    if file.suffix not in (".toml", ".json"):
        raise ConfigFileError(f"config file {path!r}: unknown format {file.suffix!r}; use a .toml or .json file")
    text = file.read_text()
    try:
        return tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"config file {path!r} is not valid TOML: {error}") from None
    except json.JSONDecodeError as error:
        raise ConfigFileError(
            f"config file {path!r} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None


def _field_names(values: dict[str, Any]) -> dict[str, Any]:
    """A config file's keys as field names (``eval-every`` -> ``eval_every``, sections too), so that
    flags merge into the same keys whichever spelling the file used."""
    return {key.replace("-", "_"): _field_names(v) if isinstance(v, dict) else v for key, v in values.items()}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config file, then explicit flags; validated."""
    path = getattr(args, "config", None)
    values = _field_names(load_config_file(path)) if path else {}
    for key, value in vars(args).items():
        if key.startswith(CONFIG_DEST) and value is not None:
            *parents, leaf = key[len(CONFIG_DEST):].split(".")
            node = values
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    try:
        config = from_dict(TrainConfig, values)
    except ConfigFileError as error:
        raise ConfigFileError(f"{error} (in {path})" if path else str(error)) from None
    config.validate()
    return config
