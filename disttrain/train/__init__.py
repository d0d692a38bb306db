"""Training: config dataclasses, the trainer loop, checkpoints, and the replica check."""
