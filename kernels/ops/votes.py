"""The default method's hot path: chunked top-k votes of a momentum, and the mean of every worker's votes.

``top_votes``: m = g + decay * m_old, cut into chunks of ``chunk`` values; in each chunk the
``per_chunk`` largest |m| are picked, their positions (one byte each) and sign codes (0: -,
1: an exact zero, 2: +) returned, and m with the picks zeroed (what stays for later steps).
``vote_mean``: every worker's (positions, codes) back into votes of -1, 0 or +1 at those
positions, summed over the workers and divided by ``divisor``.

The Triton kernels read g and m once and write the remainder once (one program per block of
chunks, the k picks made by k arg-max passes in registers), and read the wire once to write the
mean once: the fewest bytes the operations allow, where the references make a dozen passes
(``benchmarks/kernels.py`` measures how close to the roofline they get). The mean is the same
bits as the reference's (sums of +-1 are exact in fp32, the division is correctly rounded). So are
the picks and the remainder: fp fusion is off, so g + decay * m rounds twice as torch's does.
Where magnitudes tie, the kernel picks the lower position and torch's topk may pick another; a
worker's payload is its own, so replicas stay identical either way (the tests use distinct values).
"""

from __future__ import annotations

import torch

from disttrain.kernels._triton import autotune, jit, tl, triton

# Chunks per program (ROWS) and warps: a ROWS x 256 tile keeps every pass of the picks in registers.
# Two rows under the interpreter, so that tests cross a program boundary on small tensors.
_CONFIGS = [{"ROWS": rows, "num_warps": warps} for rows in (1, 2, 4, 8) for warps in (1, 2, 4, 8) if rows * 256 >= 32 * warps]
_INTERPRETER_CONFIG = {"ROWS": 2, "num_warps": 1}


def _grid(chunks: int):
    """One program per ROWS chunks."""
    return lambda meta: (triton.cdiv(chunks, meta["ROWS"]),)


def chunked(flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """``flat`` zero-padded to whole chunks, one chunk per row."""
    chunks = -(-flat.numel() // chunk)
    padded = torch.zeros(chunks * chunk, dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    return padded.view(chunks, chunk)


def top_votes_torch(
    grad: torch.Tensor, momentum: torch.Tensor | None, decay: float, chunk: int, per_chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions uint8, sign codes uint8, each chunks x per_chunk; the remainder, flat fp32)."""
    flat = grad.detach().float().reshape(-1)
    merged = flat if momentum is None else flat + decay * momentum.float().reshape(-1)
    chunks = chunked(merged, chunk)
    positions = chunks.abs().topk(per_chunk, dim=1).indices
    codes = (chunks.gather(1, positions).sign() + 1).to(torch.uint8)
    chunks.scatter_(1, positions, 0.0)
    return positions.to(torch.uint8), codes, chunks.reshape(-1)[: flat.numel()].clone()


def vote_mean_torch(positions: torch.Tensor, codes: torch.Tensor, chunk: int, numel: int, divisor: float) -> torch.Tensor:
    """The mean of W workers' votes (positions, codes: W x chunks x per_chunk) as a flat fp32 tensor."""
    workers, chunks, _ = positions.shape
    total = torch.zeros(chunks, chunk, device=positions.device)
    for w in range(workers):
        votes = codes[w].float() - 1
        dense = torch.zeros(chunks, 256, device=positions.device)
        dense.scatter_(1, positions[w].long(), votes)  # a short chunk's out-of-range positions hold zero votes
        total = total + dense[:, :chunk]
    return (total / divisor).reshape(-1)[:numel]


@autotune(configs=_CONFIGS, interpreter_config=_INTERPRETER_CONFIG, key=["chunks", "CHUNK", "PER_CHUNK", "HAS_MOMENTUM"])
@jit()
def _top_votes_kernel(
    g_ptr, m_ptr, rest_ptr, pos_ptr, code_ptr, numel, chunks, decay,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, PER_CHUNK: tl.constexpr, ROWS: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
):
    """ROWS chunks: the merged momentum, its PER_CHUNK strongest entries, and what remains."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * CHUNK + cols[None, :]
    inside = (rows[:, None] < chunks) & (cols[None, :] < CHUNK) & (offs < numel)
    merged = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_MOMENTUM:
        merged = merged + decay * tl.load(m_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    # Padding outside the chunk can never be picked; padding inside it (past numel) is a zero, as in the reference.
    magnitude = tl.where(cols[None, :] < CHUNK, tl.abs(merged), -1.0)
    for k in range(PER_CHUNK):  # a loop, not unrolled: --votes-per-chunk may be up to 256
        pick = tl.argmax(magnitude, axis=1, tie_break_left=True)
        hit = cols[None, :] == pick[:, None]
        value = tl.sum(tl.where(hit, merged, 0.0), axis=1)
        code = tl.where(value > 0, 2, tl.where(value < 0, 0, 1)).to(tl.uint8)
        out = rows * PER_CHUNK + k
        tl.store(pos_ptr + out, pick.to(tl.uint8), mask=rows < chunks)
        tl.store(code_ptr + out, code, mask=rows < chunks)
        merged = tl.where(hit, 0.0, merged)
        magnitude = tl.where(hit, -1.0, magnitude)
    tl.store(rest_ptr + offs, merged, mask=inside)


def top_votes_triton(
    grad: torch.Tensor, momentum: torch.Tensor | None, decay: float, chunk: int, per_chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top_votes_torch`` as one Triton kernel: g and m read once, the remainder written once."""
    g = grad.detach().reshape(-1).contiguous()
    m = g if momentum is None else momentum.reshape(-1).contiguous()
    chunks = -(-g.numel() // chunk)
    positions = torch.empty(chunks, per_chunk, dtype=torch.uint8, device=g.device)
    codes = torch.empty_like(positions)
    rest = torch.empty(g.numel(), dtype=torch.float32, device=g.device)
    _top_votes_kernel[_grid(chunks)](
        g, m, rest, positions, codes, g.numel(), chunks, decay,
        CHUNK=chunk, BLOCK=triton.next_power_of_2(chunk), PER_CHUNK=per_chunk,
        HAS_MOMENTUM=momentum is not None, enable_fp_fusion=False,
    )
    return positions, codes, rest


@autotune(configs=_CONFIGS, interpreter_config=_INTERPRETER_CONFIG, key=["chunks", "CHUNK", "PER_CHUNK"])
@jit()
def _vote_mean_kernel(
    pos_ptr, code_ptr, out_ptr, workers, stride_pw, stride_cw, numel, chunks, divisor,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, PER_CHUNK: tl.constexpr, ROWS: tl.constexpr,
):
    """ROWS chunks of the mean: every worker's picks for them added up in registers, stored once."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    total = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for w in range(workers):
        for k in range(PER_CHUNK):  # a loop, not unrolled: --votes-per-chunk may be up to 256
            pick = rows * PER_CHUNK + k
            position = tl.load(pos_ptr + w * stride_pw + pick, mask=rows < chunks, other=0).to(tl.int32)
            code = tl.load(code_ptr + w * stride_cw + pick, mask=rows < chunks, other=1).to(tl.float32)
            total += tl.where(cols[None, :] == position[:, None], code[:, None] - 1.0, 0.0)
    offs = rows[:, None] * CHUNK + cols[None, :]
    inside = (rows[:, None] < chunks) & (cols[None, :] < CHUNK) & (offs < numel)
    tl.store(out_ptr + offs, tl.div_rn(total, tl.full((ROWS, BLOCK), divisor, tl.float32)), mask=inside)


def vote_mean_triton(positions: torch.Tensor, codes: torch.Tensor, chunk: int, numel: int, divisor: float) -> torch.Tensor:
    """``vote_mean_torch`` as one Triton kernel: the same bits. Workers may be strided views (of a gather)."""
    workers, chunks, per_chunk = positions.shape
    if positions[0].stride() != (per_chunk, 1) or codes[0].stride() != (per_chunk, 1):
        positions, codes = positions.contiguous(), codes.contiguous()
    out = torch.empty(numel, dtype=torch.float32, device=positions.device)
    _vote_mean_kernel[_grid(chunks)](
        positions, codes, out, workers, positions.stride(0), codes.stride(0), numel, chunks, float(divisor),
        CHUNK=chunk, BLOCK=triton.next_power_of_2(chunk), PER_CHUNK=per_chunk,
    )
    return out
