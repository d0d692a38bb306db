"""Device kernels for projection and reconstruction, with their torch references.

Today every entry point is the pure-torch reference; the Triton kernels plug in behind the
same functions (dispatching on the tensor's device) without changing any caller.
"""

from disttrain.kernels.seeded import (
    StreamKey,
    project,
    reconstruct,
    reduced_dim,
    seeded_matrix,
    seeded_project,
    seeded_reconstruct_add_,
)

__all__ = [
    "StreamKey",
    "project",
    "reconstruct",
    "reduced_dim",
    "seeded_matrix",
    "seeded_project",
    "seeded_reconstruct_add_",
]
