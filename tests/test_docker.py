"""docker/: the Dockerfile, the compose file and .dockerignore, linted so that they cannot rot.

No image is built here (no registry to pull the base image from): these tests read the files."""

import argparse
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from torch.distributed.run import get_args_parser as torchrun_parser

from disttrain import cli
from disttrain.launcher import worker

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
SECRETS_DIR = "/run/secrets/"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) for every Dockerfile instruction, continuations joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(word.upper(), rest.strip()) for word, rest in (line.split(None, 1) for line in joined.splitlines() if line.strip())]


def arguments(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    return [(words[:-1], words[-1]) for words in map(str.split, arguments("COPY")) if not words[0].startswith("--from")]


def compose() -> dict:
    """The compose file with every ${VAR:-default} replaced by its default."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", COMPOSE.read_text())
    assert "${" not in text, "every variable in compose.yaml needs a default: ${VAR:-default}"
    return yaml.safe_load(text)


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    """docker/requirements.txt as {name: version}; every line must be name==version."""
    lines = [line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    pinned = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+]*)", line).groups() for line in lines)
    assert len(pinned) == len(lines)
    return pinned


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser, and its sub-command parsers, refusing abbreviated flags."""
    parser.allow_abbrev = False
    for action in parser._actions:  # argparse offers no public way to reach sub-command parsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)
    return parser


def parse_command(argv: list) -> argparse.Namespace:
    """What the program that ``argv`` starts makes of it; fails on any flag it does not know."""
    program, *rest = map(str, argv)  # YAML may hand over numbers
    if program == "torchrun":
        launch = strict(torchrun_parser()).parse_args(rest)
        assert launch.module, "torchrun must start a module (-m)"
        program, rest = launch.training_script, launch.training_script_args
    if program == "disttrain":
        args, extra = strict(cli.build_parser()).parse_known_args(rest)
        assert not extra, f"disttrain {args.command} does not know {extra}"
        if args.command == "train":
            worker.check_worker_args(args)  # values the trainer would refuse
        return args
    assert program == "disttrain.launcher", f"{argv[0]} does not start a disttrain command"
    args, extra = strict(worker.build_parser()).parse_known_args(rest)
    assert not extra, f"the worker does not know {extra}"
    worker.check_worker_args(args)
    return args


def commands() -> dict[str, list]:
    """Every command the image runs: its default and each compose service's."""
    found = {"Dockerfile CMD": json.loads(arguments("CMD")[-1])}
    found.update({name: service["command"] for name, service in compose()["services"].items()})
    return found


def dockerignored(path: str) -> bool:
    """Docker's rule: the last .dockerignore pattern matching the path, or a directory above it, decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        regex = re.compile(
            "".join(
                {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
                for token in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]", pattern.lstrip("!").strip("/"))
            )
        )
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_the_base_image_is_pinned_to_a_version_tag():
    defaults = dict(arg.split("=", 1) for arg in arguments("ARG") if "=" in arg)
    for image in arguments("FROM"):
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image.split()[0])
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"\d+(\.\d+)+-\S+", tag) and "latest" not in tag, f"FROM {image} is not pinned to a version tag"


def test_every_copy_source_exists_and_no_tracked_file_under_it_is_dockerignored():
    for sources, _ in copies():
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True, check=True)
            files = tracked.stdout.split()
            assert files, f"COPY {source}: git tracks nothing there"
            assert not [f for f in files if dockerignored(f)], f"COPY {source}: .dockerignore leaves files out"


def test_dockerignore_keeps_the_job_secret_and_caches_out_of_the_build_context():
    assert all(map(dockerignored, ["docker/job_secret", "disttrain/__pycache__/cli.cpython-311.pyc", "runs/x", ".git/HEAD"]))


def test_pip_installs_only_the_pinned_requirements_and_the_copied_source():
    requirements = {destination for sources, destination in copies() if sources == [str(REQUIREMENTS.relative_to(ROOT))]}
    projects = {destination.rstrip("/") for sources, destination in copies() if "pyproject.toml" in sources}
    installs = [command.split()[2:] for run in arguments("RUN") for command in run.split("&&") if command.split()[:2] == ["pip", "install"]]
    assert installs and pins()
    for words in installs:
        files = {words[i + 1] for i, word in enumerate(words) if word == "-r"}
        targets = {word for word in words if not word.startswith("-")} - files
        assert files <= requirements and targets <= projects, f"pip install {' '.join(words)}: installs what is not copied in"


def test_the_pins_satisfy_every_dependency_in_pyproject():
    pinned = pins()
    for line in project()["dependencies"] + project()["optional-dependencies"]["gpu"]:
        requirement = Requirement(line)
        assert requirement.name in pinned, f"{requirement.name} is not pinned in docker/requirements.txt"
        assert requirement.specifier.contains(pinned[requirement.name]), f"{requirement.name}=={pinned[requirement.name]} breaks {line}"


@pytest.mark.parametrize("where", ["Dockerfile CMD", "coordinator", "worker"])
def test_every_command_is_a_real_disttrain_command_line(where):
    parse_command(commands()[where])


def test_workers_reach_the_coordinator_service_on_its_bound_and_published_ports():
    services = compose()["services"]
    bind = parse_command(services["coordinator"]["command"]).bind
    port = int(bind.rsplit(":", 1)[1])
    address = parse_command(services["worker"]["command"]).coordinator
    assert address == f"tcp://coordinator:{port}"
    assert {str(p) for p in arguments("EXPOSE")[0].split()} == {str(port), str(port + 1)}
    assert set(services["coordinator"]["ports"]) == {f"{port}:{port}", f"{port + 1}:{port + 1}"}


def test_compose_refers_only_to_defined_services_and_secrets():
    spec = compose()
    for name, service in spec["services"].items():
        assert set(service.get("depends_on", [])) <= set(spec["services"]), name
        mounted = set(service.get("secrets", []))
        assert mounted <= set(spec["secrets"]), name
        secret_file = parse_command(service["command"]).secret_file
        assert secret_file.startswith(SECRETS_DIR) and secret_file.removeprefix(SECRETS_DIR) in mounted, name
    built = [service["build"] for service in spec["services"].values() if "build" in service]
    assert [(COMPOSE.parent / b["context"]).resolve() / b["dockerfile"] for b in built] == [DOCKERFILE]
    assert {service["image"] for service in spec["services"].values()} == {f"disttrain:{project()['version']}"}

