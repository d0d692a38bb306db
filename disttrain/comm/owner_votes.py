"""Sparse votes summed by the owners of their chunks, so that a worker's bytes do not grow with the workers.

An all_gather of sparse votes makes every worker receive and pass on every other worker's
payload: (W - 1) payloads each. Here the chunks of 256 values are split into W equal ranges,
one per worker (its owner). One all_to_all sends each range's votes to its owner only; the
owner sums them, keeps in every chunk the ``keep`` positions with the largest vote count, and
one all_gather hands every worker each owner's kept pairs (a byte of position, four bits of count). Every worker then
applies the same mean votes. A worker sends about one vote payload plus one kept payload
whatever W is (the pattern of Ok-Topk, Li and Hoefler 2022). What differs from the all_gather:
in a chunk where the workers' votes fall on more than ``keep`` positions, the weakest wait, and a
count beyond +-7 sends 7 and keeps the rest: the owner adds what it did not send to the next
round's counts (error feedback), until membership changes and the ranges move. With at most 7
workers and ``keep`` >= workers x votes per chunk nothing waits: the result is the all_gather's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from typing import Any

from disttrain.comm.bucket import Bucket, PendingExchange, all_gather_flat
from disttrain.comm.waiting import wait_work
from disttrain.compress.base import Compressor
from disttrain.compress.lowbit import pack_codes, unpack_codes
from disttrain.compress.sparse_momentum import CHUNK, SparseMomentum

COUNT_LIMIT = 7  # a kept vote count travels in four bits, as count + 8


class OwnerVotesBucket(Bucket):
    """The sparse momentum votes of several parameters, reduced by chunk owners (all_to_all, then all_gather)."""

    def __init__(self, param_indices: list[int], compressors: list[Compressor], keep: int):
        if not all(isinstance(c, SparseMomentum) for c in compressors):
            raise TypeError("votes are reduced by chunk owners only for sparse momentum payloads")
        if keep < 1:
            raise ValueError(f"owners must keep at least 1 vote position per chunk, got {keep}")
        super().__init__(param_indices, compressors)
        self.votes: list[SparseMomentum] = list(compressors)  # type: ignore[arg-type]
        self.chunks = sum(c.chunks for c in self.votes)
        self.picks = max(c.per_chunk for c in self.votes)  # a chunk's votes, padded to the widest
        self.keep = min(keep, CHUNK)
        self._group: dist.ProcessGroup | None = None
        self._owner = (0, 1)  # (rank, world size) of the last launch: which range this worker owns
        self.residual: torch.Tensor | None = None  # counts of its range not sent yet, one row of 256 per chunk
        self.residual_owner: tuple[int, int] | None = None  # the range they belong to
        self._pending_residual: torch.Tensor | None = None

    def _record_bytes(self) -> int:
        """One chunk's votes: a byte per position, two bits per vote."""
        return self.picks + -(-self.picks // 4)

    def _kept_bytes(self) -> int:
        """One chunk's kept pairs: a byte per position, four bits per count."""
        return self.keep + -(-self.keep // 2)

    def _chunks_per_owner(self, world_size: int) -> int:
        return -(-self.chunks // world_size)

    def payload_bytes_for(self, world_size: int) -> int:
        """What a worker puts into the two collectives: its votes, then its kept (position, count) pairs."""
        return self.chunks * self._record_bytes() + self._chunks_per_owner(world_size) * self._kept_bytes()

    def wire_bytes(self, world_size: int) -> int:
        """What a worker sends: the votes of the W - 1 ranges it does not own, and its kept pairs to W - 1 workers."""
        per_owner = self._chunks_per_owner(world_size)
        return (world_size - 1) * per_owner * (self._record_bytes() + self._kept_bytes())

    def encode(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Every chunk's votes as one fixed-size record, chunks in parameter order."""
        positions, signs = [], []
        for compressor, grad in zip(self.votes, grads):
            picked, votes = compressor.votes(compressor.encode(grad))
            pad = self.picks - compressor.per_chunk  # a parameter smaller than the picks: no votes there
            positions.append(torch.nn.functional.pad(picked, (0, pad)))
            signs.append(torch.nn.functional.pad(votes, (0, pad)))
        codes = (torch.cat(signs) + 1).to(torch.uint8)  # 0: -, 1: no vote, 2: +
        width = -(-self.picks // 4) * 4
        codes = torch.nn.functional.pad(codes, (0, width - self.picks), value=1)
        packed = pack_codes(codes, 2).view(self.chunks, -1)
        return torch.cat([torch.cat(positions).to(torch.uint8), packed], dim=1)

    def launch(self, records: torch.Tensor, group: dist.ProcessGroup | None) -> PendingExchange:
        """Send each owner its range's votes (asynchronously); the owners' work follows in mean_coefficients()."""
        world = dist.get_world_size(group)
        self._group = group
        self._owner = (dist.get_rank(group), world)
        per_owner = self._chunks_per_owner(world)
        padded = torch.zeros(world * per_owner, records.shape[1], dtype=torch.uint8, device=records.device)
        padded[: self.chunks] = records
        padded[self.chunks :, self.picks :] = 0x55  # padding chunks hold "no vote" codes
        output = torch.empty_like(padded)
        work = dist.all_to_all_single(output, padded, group=group, async_op=True)
        return PendingExchange(work, output, self.payload_bytes_for(world), self.wire_bytes(world))

    def _counts(self, received: torch.Tensor, world_size: int) -> torch.Tensor:
        """The owner's summed votes, one row of 256 per chunk of its range, from every worker's records."""
        per_owner = received.shape[0] // world_size
        rows = received.view(world_size, per_owner, -1)
        positions = rows[:, :, : self.picks].long()
        width = rows.shape[2] - self.picks
        codes = unpack_codes(rows[:, :, self.picks :].reshape(-1), 2, world_size * per_owner * width * 4)
        votes = codes.view(world_size, per_owner, -1)[:, :, : self.picks].float() - 1
        counts = torch.zeros(per_owner, CHUNK, device=received.device)
        counts.scatter_add_(1, positions.permute(1, 0, 2).reshape(per_owner, -1), votes.permute(1, 0, 2).reshape(per_owner, -1))
        return counts

    def _kept(self, counts: torch.Tensor) -> torch.Tensor:
        """Each chunk's ``keep`` strongest (position, count) pairs, as bytes; what is left waits."""
        if self.residual is not None and self.residual_owner == self._owner:
            counts = counts + self.residual
        positions = counts.abs().topk(self.keep, dim=1).indices
        kept = counts.gather(1, positions).clamp(-COUNT_LIMIT, COUNT_LIMIT)
        self._pending_residual = counts.scatter_add(1, positions, -kept)
        codes = torch.nn.functional.pad((kept + COUNT_LIMIT + 1).to(torch.uint8), (0, self.keep % 2))
        return torch.cat([positions.to(torch.uint8), pack_codes(codes, 4).view(counts.shape[0], -1)], dim=1).contiguous()

    def commit(self) -> None:
        if self._pending_residual is not None:
            self.residual, self.residual_owner, self._pending_residual = self._pending_residual, self._owner, None

    def rollback(self) -> None:
        self._pending_residual = None

    def state_dict(self) -> dict[str, Any]:
        """The counts this worker's range still owes (its own state: a joiner starts without)."""
        if self.residual is None or self.residual_owner is None:
            return {}
        return {"residual": self.residual.clone(), "owner": list(self.residual_owner)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residual = state["residual"].clone() if "residual" in state else None
        self.residual_owner = tuple(state["owner"]) if "owner" in state else None  # type: ignore[assignment]
        self._pending_residual = None

    def mean_coefficients(self, output: torch.Tensor, world_size: int, divisor: int) -> list[torch.Tensor]:
        """Sum this worker's range, all_gather every owner's kept votes, and decode the mean of each parameter."""
        kept = self._kept(self._counts(output, world_size))
        gathered = torch.empty(world_size * kept.numel(), dtype=torch.uint8, device=kept.device)
        wait_work(all_gather_flat(gathered, kept.reshape(-1), group=self._group, async_op=True))
        pairs = gathered.view(-1, self._kept_bytes())[: self.chunks]
        positions = pairs[:, : self.keep].long()
        codes = unpack_codes(pairs[:, self.keep :].reshape(-1), 4, pairs.shape[0] * 2 * (self._kept_bytes() - self.keep))
        counts = codes.view(pairs.shape[0], -1)[:, : self.keep].float() - (COUNT_LIMIT + 1)
        means, start = [], 0
        for compressor in self.votes:
            rows = slice(start, start + compressor.chunks)
            start += compressor.chunks
            mean = compressor.scatter(positions[rows], counts[rows] / divisor)
            means.append(mean)
            compressor.accept_mean(mean)
        return means
