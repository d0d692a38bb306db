"""disttrain: train over slow links by exchanging low-rank projections of gradients."""

__version__ = "0.1.0"

from disttrain.wrap import wrap  # noqa: E402

__all__ = ["wrap"]
