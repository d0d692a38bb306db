"""CompressedAllReduce: average a model's gradients by exchanging only compressed payloads."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any, Iterable

import torch
import torch.distributed as dist

from disttrain.comm.bucket import Bucket, BucketFactory, PendingExchange, plan_buckets
from disttrain.comm.owner_votes import OwnerVotesBucket
from disttrain.comm.link import LinkEmulator, ring_wire_bytes
from disttrain.comm.waiting import wait_work
from disttrain.compress.base import Compressor, load_compressor_states
from disttrain.compress.factory import CompressionSpec, build_compressor

log = logging.getLogger(__name__)

DEFAULT_BUCKET_CAP_BYTES = 4 * 1024 * 1024


class CollectiveFailed(RuntimeError):
    """A collective of this step failed; no state of the step was kept."""


class CompressedAllReduce:
    """Buckets parameters, encodes their gradients, runs one collective per bucket, decodes.

    Per step: ``start_step(step)``, backward (with ``overlap`` the bucket collectives launch
    from gradient hooks while backward still runs), ``finish()``, then either
    ``write_gradients()`` for a standard optimizer or ``coefficients(p)`` for ProjectedAdamW,
    then ``commit()`` once the update is applied, or ``rollback()`` to forget the step.
    Buckets launch strictly in index order, so every rank issues its collectives in the
    same order whatever order its gradients arrive in. With ``fixed_membership``, int8
    payloads fall back to fp32 when that moves fewer bytes for this world size.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        spec: CompressionSpec,
        seed: int,
        group: dist.ProcessGroup | None = None,
        bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
        overlap: bool = True,
        link: LinkEmulator | None = None,
        fixed_membership: bool = True,
    ):
        spec.validate()
        self.params = [p for p in params if p.requires_grad]
        self._index_of = {id(p): i for i, p in enumerate(self.params)}
        self.group = group
        self.link = link
        check_rank_fits(spec, [p.shape for p in self.params])
        self._measuring = False  # measure captured energy while encoding (adaptive refresh)
        self._energy = (0.0, 0.0)
        # With elastic membership the world size changes, and every member, joiners included,
        # must encode alike: keep the configured payload there.
        shapes = [p.shape for p in self.params]
        self.spec = cheaper_payload(spec, shapes, dist.get_world_size(group)) if fixed_membership else spec
        self.compressors: list[Compressor] = [
            build_compressor(self.spec, p.shape, index, seed) for index, p in enumerate(self.params)
        ]
        self.buckets: list[Bucket] = plan_buckets(self.compressors, bucket_cap_bytes, bucket_factory(self.spec))
        self._bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket.param_indices}
        self.dense_bytes_per_step = sum(p.numel() * 4 for p in self.params)
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0  # what the collectives move per worker (see link.ring_wire_bytes)
        self.step = 0
        self._armed = False
        self._hook_failure: RuntimeError | None = None
        self._ready = [0] * len(self.buckets)
        self._pending: list[tuple[PendingExchange, float] | None] = [None] * len(self.buckets)
        self._next_launch = 0
        self._means: list[torch.Tensor | None] = [None] * len(self.params)
        self.keep_own = False  # decode this worker's own payloads too (``own_updates``), for eager outer steps
        self._own: list[torch.Tensor | None] = [None] * len(self.params)
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._hook_for(i)) for i, p in enumerate(self.params)
        ] if overlap else []

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def compressed_payload_bytes(self) -> int:
        """Bytes this worker puts into collectives per step, not counting basis refreshes."""
        return sum(bucket.payload_bytes_for(self.world_size) for bucket in self.buckets)

    def _hook_for(self, index: int):
        def hook(_: torch.Tensor) -> None:
            if self._armed and self._hook_failure is None:
                self._ready[self._bucket_of[index]] += 1
                try:
                    self._launch_ready()
                except RuntimeError as error:  # raised inside backward: report it from finish()
                    self._hook_failure = error

        return hook

    def start_step(self, step: int) -> None:
        """Prepare step ``step`` (its index picks seeded bases and refresh times)."""
        self.step = step
        for compressor in self.compressors:
            compressor.begin_step(step)
        self._ready = [0] * len(self.buckets)
        self._pending = [None] * len(self.buckets)
        self._next_launch = 0
        self._means = [None] * len(self.params)
        self.payload_bytes_last_step = 0
        self.wire_bytes_last_step = 0
        self._hook_failure = None
        self._armed = True

    def _launch_ready(self, force: bool = False) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if not force and self._ready[self._next_launch] < len(bucket.param_indices):
                return
            self._launch(self._next_launch)
            self._next_launch += 1

    def _gradient(self, index: int) -> torch.Tensor:
        grad = self.params[index].grad
        return torch.zeros_like(self.params[index]) if grad is None else grad

    def _count(self, payload_bytes: int, wire_bytes: int) -> float:
        """Count a collective's bytes; the time its bytes take on an emulated link (0 without one)."""
        self.payload_bytes_last_step += payload_bytes
        self.wire_bytes_last_step += wire_bytes
        return 0.0 if self.link is None else self.link.reserve(wire_bytes)

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        grads = [self._gradient(i) for i in bucket.param_indices]
        basis_bytes = bucket.refresh_bases(grads, self.step, self.group)
        if self._measuring:
            for compressor, grad in zip(bucket.compressors, grads):
                part, whole = compressor.captured_energy(grad)
                self._energy = (self._energy[0] + part, self._energy[1] + whole)
        if basis_bytes:
            LinkEmulator.wait_until(self._count(basis_bytes, ring_wire_bytes("broadcast", basis_bytes, self.world_size)))
        flat = bucket.encode(grads)
        if self.keep_own:  # before the collective, which may reduce ``flat`` in place
            for index, own in zip(bucket.param_indices, bucket.own_coefficients(flat)):
                self._own[index] = own
        pending = bucket.launch(flat, self.group)
        self._pending[b] = (pending, self._count(pending.payload_bytes, pending.wire_bytes))

    def launch_all(self) -> None:
        """Encode every bucket now and start its collective (for a caller that does not wait during backward)."""
        self._launch_ready(force=True)

    def finish(self, contributors: int | None = None) -> None:
        """Launch what backward did not, wait for every collective, and decode the means: over
        all workers, or over ``contributors`` of them when the others sent zeros."""
        try:
            if self._hook_failure is not None:
                raise self._hook_failure
            self._launch_ready(force=True)
            for bucket, entry in zip(self.buckets, self._pending):
                assert entry is not None
                pending, deadline = entry
                if pending.work is not None:
                    wait_work(pending.work)
                LinkEmulator.wait_until(deadline)
                means = bucket.mean_coefficients(pending.output, self.world_size, contributors or self.world_size)
                for index, mean in zip(bucket.param_indices, means):
                    self._means[index] = mean
        except RuntimeError as error:
            self.rollback()
            raise CollectiveFailed(f"step {self.step}: a collective failed ({error}); the step was rolled back") from error
        finally:
            self._armed = False

    def coefficients(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, Compressor] | None:
        """The averaged coefficients of ``param`` this step and the compressor that reads them."""
        index = self._index_of.get(id(param))
        if index is None or self._means[index] is None:
            return None
        return self._means[index], self.compressors[index]

    def own_updates(self) -> list[torch.Tensor]:
        """What this worker sent in the launched exchange, reconstructed alone (needs ``keep_own``), by parameter."""
        own, self._own = self._own, [None] * len(self.params)
        if any(coeffs is None for coeffs in own):
            raise RuntimeError("own_updates() needs keep_own set before the exchange was launched")
        return [compressor.reconstruct(coeffs) for compressor, coeffs in zip(self.compressors, own)]

    def write_gradients(self) -> None:
        """Replace every parameter's gradient with the reconstructed average."""
        for p, compressor, mean in zip(self.params, self.compressors, self._means):
            if mean is None:
                raise RuntimeError("write_gradients() called before finish()")
            p.grad = compressor.reconstruct(mean).to(p.dtype)

    def measure_next_step(self, on: bool) -> None:
        """Measure the captured energy while encoding the coming step (or not); a measurement starts from zero."""
        self._measuring = on
        if on:
            self._energy = (0.0, 0.0)

    def captured_energy(self) -> float | None:
        """||P^T G||^2 / ||G||^2 of this worker's projected gradients measured since the last
        measure_next_step(True) (None if nothing was measured or projected)."""
        captured, total = self._energy
        return captured / total if total > 0 else None

    def request_refresh(self) -> None:
        """Recompute every data-dependent basis at the next step."""
        for compressor in self.compressors:
            compressor.request_refresh()

    def commit(self) -> None:
        for stateful in (*self.compressors, *self.buckets):
            stateful.commit()

    def rollback(self) -> None:
        for stateful in (*self.compressors, *self.buckets):
            stateful.rollback()
        self._armed = False

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        return {"compressors": [c.state_dict() for c in self.compressors], "buckets": [b.state_dict() for b in self.buckets]}

    def shared_state_dict(self) -> dict[str, Any]:
        """What a joiner needs to match the others: bases, not this worker's residuals."""
        return {"compressors": [c.shared_state_dict() for c in self.compressors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (or shared_state_dict(), which holds no bucket state: buckets start without)."""
        load_compressor_states(self.compressors, state["compressors"])
        buckets = state.get("buckets", [{}] * len(self.buckets))
        if len(buckets) != len(self.buckets):
            raise ValueError(f"checkpoint has state for {len(buckets)} buckets, this exchange has {len(self.buckets)}: it was written with another bucket cap")
        for bucket, saved in zip(self.buckets, buckets):
            bucket.load_state_dict(saved)

    def state_bytes(self) -> int:
        """Bytes of the compressors' persistent state and the buckets' own (an owner's unsent vote counts)."""
        owed = [t for b in self.buckets for t in b.state_dict().values() if torch.is_tensor(t)]
        return sum(c.state_bytes() for c in self.compressors) + sum(t.numel() * t.element_size() for t in owed)


def bucket_factory(spec: CompressionSpec) -> BucketFactory:
    """How a bucket of this spec's payloads is reduced: one collective, or votes summed by chunk owners."""
    if spec.vote_reduction == "owners":
        return functools.partial(OwnerVotesBucket, keep=spec.owner_keep)
    return Bucket


def cheaper_payload(spec: CompressionSpec, shapes: list[torch.Size], world_size: int) -> CompressionSpec:
    """Quantised payloads travel by all_gather, whose traffic grows with the number of workers; keep
    them only while they move fewer bytes than an fp32 all_reduce of the same coefficients."""
    if not spec.quantized:
        return spec
    fp32 = replace(spec, payload="fp32")

    def wire(candidate: CompressionSpec, kind: str) -> int:
        payload = sum(build_compressor(candidate, shape, i, 0).wire_bytes() for i, shape in enumerate(shapes))
        return ring_wire_bytes(kind, payload, world_size)

    if wire(spec, "all_gather") <= wire(fp32, "all_reduce"):
        return spec
    log.info("with %d workers an fp32 all_reduce moves fewer bytes than %s all_gather: sending fp32", world_size, spec.payload)
    return fp32


def check_rank_fits(spec: CompressionSpec, shapes: list[torch.Size]) -> None:
    """A rank that leaves every matrix dense is a mistake worth naming."""
    matrices = [shape for shape in shapes if len(shape) >= 2 and shape.numel() >= spec.dense_threshold]
    if not spec.projects or not matrices:
        return
    if not any(spec.compresses(shape) for shape in matrices):
        widest = max(min(shape[0], shape[1:].numel()) for shape in matrices)
        raise ValueError(
            f"rank {spec.rank} is >= min(m, n) of every weight matrix (the largest is {widest}), "
            f"so nothing would be compressed; choose a rank below {widest}"
        )
