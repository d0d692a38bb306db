"""The data plane: one torch.distributed collective per bucket of compressed payloads."""

from disttrain.comm.allreduce import CollectiveFailed, CompressedAllReduce
from disttrain.comm.ddp_hook import DisttrainHookState, disttrain_hook
from disttrain.comm.link import LinkEmulator

__all__ = ["CollectiveFailed", "CompressedAllReduce", "DisttrainHookState", "LinkEmulator", "disttrain_hook"]
