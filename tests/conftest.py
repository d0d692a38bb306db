import os
import sys
from pathlib import Path

# The tests import the installed disttrain, never the checkout's disttrain/ folder, which (under a
# non-editable install) lacks the launcher and kernels sub-packages pyproject.toml maps in.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
# Make tests/distributed.py importable from the spawned worker processes too.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hypothesis import settings  # noqa: E402

# Multi-process and linear-algebra examples are slow to start: no per-example deadline.
settings.register_profile("disttrain", deadline=None, max_examples=25)
settings.load_profile("disttrain")
