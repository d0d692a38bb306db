"""A fresh machine can run both README commands: what the code imports, the install command brings."""

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SCANNED = ("disttrain", "launcher", "kernels", "benchmarks", "tests", "examples")
README_TEST_COMMAND = 'python -m pip install "torch==2.13.0" -e ".[test]" && python -m pytest'


def distribution_name(requirement: str) -> tuple[str, list[str]]:
    """(normalised distribution name, extras it asks for) of a requirement string."""
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, requirement
    extras = [extra.strip() for extra in (match.group(2) or "").split(",") if extra.strip()]
    return match.group(1).lower().replace("_", "-"), extras


def requirements_of_extra(extra: str) -> list[str]:
    """The project's own requirements plus those of ``extra``, following ``disttrain[...]`` self-references."""
    wanted, seen, todo = list(PROJECT["dependencies"]), set(), [extra]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in PROJECT["optional-dependencies"][name]:
            dist, extras = distribution_name(requirement)
            if dist == PROJECT["name"]:
                todo += extras
            else:
                wanted.append(requirement)
    return wanted


def installed_closure(requirements: list[str]) -> set[str]:
    """Every distribution those requirements pull in, by the installed packages' own metadata."""
    closure, queue = set(), [distribution_name(r)[0] for r in requirements]
    while queue:
        dist = queue.pop()
        if dist in closure:
            continue
        closure.add(dist)
        try:
            queue += [distribution_name(r)[0] for r in metadata.requires(dist) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    return closure


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported at module level (imports inside functions are lazy and allowed)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def local_modules() -> set[str]:
    """Names that resolve inside the repository (the package, top-level folders, helper modules)."""
    names = {p.name for p in REPO.iterdir() if p.is_dir()} | {p.stem for p in REPO.glob("*.py")}
    return names | {p.stem for folder in SCANNED for p in (REPO / folder).glob("*.py")}


def test_every_module_level_import_is_brought_by_the_test_install():
    closure = installed_closure(requirements_of_extra("test"))
    provided = {
        module
        for module, dists in metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in closure for d in dists)
    }
    allowed = provided | local_modules() | set(sys.stdlib_module_names)
    missing = {
        f"{path.relative_to(REPO)} imports {name}"
        for folder in SCANNED
        for path in (REPO / folder).rglob("*.py")
        for name in module_level_imports(path) - allowed
    }
    assert not missing, f"`pip install -e .[test]` does not install what these import: {sorted(missing)}"


def test_readme_gives_the_test_command_that_ci_runs():
    assert README_TEST_COMMAND in (REPO / "README.md").read_text()
    assert README_TEST_COMMAND in (REPO / ".ci" / "run").read_text()


def test_ci_builds_its_own_virtual_environment_without_system_packages():
    script = (REPO / ".ci" / "run").read_text()
    assert "-m venv" in script and "--system-site-packages" not in script
    assert 'source "$venv/bin/activate"' in script
