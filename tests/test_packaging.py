"""The wheel installs everything under disttrain/: every subpackage, nothing named kernels or launcher at top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("disttrain-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_wheel_holds_only_the_disttrain_package_with_its_corpus(wheel_names):
    top_level = {name.split("/")[0] for name in wheel_names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"disttrain"}
    assert "disttrain/kernels/seeded.py" in wheel_names
    assert "disttrain/launcher/__main__.py" in wheel_names
    assert "disttrain/data/kjv.txt.gz" in wheel_names


def test_wheel_holds_every_subpackage_of_the_source_tree(wheel_names):
    packaged = {name.rsplit("/", 1)[0] for name in wheel_names if name.endswith("/__init__.py")}
    in_source = {str(init.parent.relative_to(REPO)) for init in (REPO / "disttrain").rglob("__init__.py")}
    assert in_source <= packaged, f"add {sorted(in_source - packaged)} to [tool.setuptools] packages in pyproject.toml"


def test_python_run_in_the_checkout_root_imports_the_installed_kernels_package_not_the_folder():
    """transformers imports Hugging Face's `kernels`; the checkout's kernels/ folder must not hide it."""
    probe = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"
    origin = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    assert origin == "None" or not Path(origin).resolve().is_relative_to(REPO), f"`import kernels` in {REPO} finds {origin}"
