"""disttrain: train over slow links by exchanging compressed updates; any model, in your own loop."""

__version__ = "0.1.0"

from disttrain.comm.layout import shard_within_node  # noqa: E402
from disttrain.methods import DEFAULT_METHOD, DEFAULT_PER_STEP_METHOD  # noqa: E402
from disttrain.models.lora import add_lora  # noqa: E402
from disttrain.session import Session, StepReport, wrap  # noqa: E402

__all__ = ["DEFAULT_METHOD", "DEFAULT_PER_STEP_METHOD", "Session", "StepReport", "add_lora", "shard_within_node", "wrap"]
