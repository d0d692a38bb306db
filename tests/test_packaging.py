"""The wheel installs everything under disttrain/: nothing named kernels or launcher at top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_the_disttrain_package_with_its_corpus(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("disttrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"disttrain"}
    assert "disttrain/kernels/seeded.py" in names
    assert "disttrain/launcher/__main__.py" in names
    assert "disttrain/data/kjv.txt.gz" in names
