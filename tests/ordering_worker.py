"""One worker of test_capped_link: many small buckets, gradients arriving in a rank-dependent
order, over a capped link. Prints the order the gradients arrived in and a digest of the results."""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from disttrain.comm.allreduce import CompressedAllReduce
from disttrain.compress.factory import CompressionSpec

PARAMS = 12


def main(payload: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 48)) for _ in range(PARAMS)]
    spec = CompressionSpec(basis="seeded", rank=4, payload=payload, dense_threshold=1)
    reducer = CompressedAllReduce(params, spec, seed=0, bucket_cap_bytes=256)
    arrival: list[int] = []
    for index, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda _, index=index: arrival.append(index))
    x = torch.randn(48, generator=torch.Generator().manual_seed(rank))
    order = list(range(PARAMS)) if rank == 0 else list(reversed(range(PARAMS)))
    digest = hashlib.sha256()
    for step in range(3):
        reducer.start_step(step)
        sum((params[i] @ x).square().sum() * (i + 1) for i in order).backward()
        reducer.finish()
        reducer.write_gradients()
        reducer.commit()
        for p in params:
            digest.update(p.grad.numpy().tobytes())
            p.grad = None
    print(json.dumps({"buckets": len(reducer.buckets), "arrival": arrival[:PARAMS], "digest": digest.hexdigest()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
