"""The Triton kernels against their torch references, and the dispatch between them.

Triton decides between compiling and interpreting when a kernel is decorated, that is when
disttrain.kernels is first imported, which an earlier test module has done by the time this one
runs in the full suite. So the kernel cases (``@kernel_case``) are collected where this process
can run them: with CUDA (compiled), or when TRITON_INTERPRET=1 was set before the first import.
``test_kernel_cases_pass_under_the_interpreter`` reruns this file in such a fresh process, so on
a machine without CUDA the cases still run, on CPU tensors, under Triton's interpreter.

Tolerances are bounds on rounding, scaled elementwise by the sum of the magnitudes that went
into each output (``magnitude``): a dot product of k fp32 terms, summed in any order, is within
k * 2**-24 of that sum from the exact value (Higham's gamma_k), and the kernel and the reference
each make that error, hence 2 * k * 2**-24. What the kernels add on top is named in ``DOT_ERROR``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import torch

from disttrain import kernels
from disttrain.compress import CompressionSpec, build_compressor
from disttrain.kernels import _triton, dispatch, projection, quant, reconstruction, seeded, votes
from disttrain.kernels.basis import SeededMatrix, dense
from test_cli import last_json_line
from test_seeded_basis import GAUSSIAN_DIGEST, RADEMACHER_DIGEST
from tiny import TINY_FLAGS

INTERPRETED = _triton.interpreted()
COMPILES = _triton.available() and torch.cuda.is_available()
DEVICE = torch.device("cpu") if INTERPRETED else torch.device("cuda") if COMPILES else None
REPO = Path(__file__).resolve().parent.parent
EPS = 2.0**-24  # fp32 unit roundoff
F = TypeVar("F", bound=Callable[..., None])

needs_triton = pytest.mark.skipif(not _triton.available(), reason="triton is not installed: pip install disttrain[test]")

# Relative error a kernel's tile products add, by the dtype of the big operand. fp32 runs as
# tf32x3: each operand is split into a tf32 high part and a tf32 low part (the tensor cores may
# truncate each, 2**-10), so a dropped low-part remainder costs at most 2**-20 per operand, and
# with the dropped low x low product under 3 * 2**-20 per product: 2**-18 covers it. bf16 data
# multiplies in bf16 with P rounded to bf16: 2**-9 per product, doubled for margin. The
# interpreter multiplies in plain fp32 (numpy).
DOT_ERROR = {torch.float32: 0.0 if INTERPRETED else 2.0**-18, torch.bfloat16: 0.0 if INTERPRETED else 2.0**-8}
# Rounding a result to bf16 costs 2**-9; the reference rounds twice (P R, then the sum) and the
# kernel once, after a bf16 dot that rounds both operands: 5 * 2**-9 < 2**-6.
BF16_OUTPUT_ERROR = 2.0**-6


def kernel_case(test: F) -> F | None:
    """Collect ``test`` only where this process can run the kernels (see the module docstring)."""
    return test if DEVICE is not None else None


def _let_the_interpreter_run_on_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns loop bounds into ints with int() on 1-element arrays, which
    NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream by #9172): the same fix here."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:  # a Triton whose interpreter is laid out differently (and fixed)
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _let_the_interpreter_run_on_numpy_2_4()


@pytest.fixture
def device():
    """The device the kernel cases run on, with the Triton backend forced."""
    with kernels.backend("triton"):
        yield DEVICE


def make_basis(kind: str, rows: int, rank: int, device: torch.device, seed: int = 0):
    """A stored basis (random, fp32) or a seeded one."""
    if kind == "stored":
        return torch.randn(rows, rank, generator=torch.Generator().manual_seed(seed)).to(device)
    return SeededMatrix(kernels.StreamKey.derive(seed, 1, 2), rows, rank, kind)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Reproducible normal samples, drawn on the CPU whatever the device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, relative: float) -> None:
    """|actual - expected| <= relative * magnitude, elementwise."""
    error = (actual.float().cpu() - expected.float().cpu()).abs()
    bound = relative * magnitude.float().cpu()
    worst = (error / bound.clamp_min(torch.finfo(torch.float32).tiny)).max().item()
    assert (error <= bound).all(), f"error reaches {worst:.3g} times the bound ({relative:.3g} x magnitude)"


# --- the random matrix -----------------------------------------------------------------------


@kernel_case
@pytest.mark.parametrize(("distribution", "digest"), [("gaussian", GAUSSIAN_DIGEST), ("rademacher", RADEMACHER_DIGEST)])
def test_triton_generator_reproduces_the_pinned_matrices(device, distribution, digest):
    matrix = kernels.seeded_matrix(kernels.StreamKey.derive(0, 0, 0), 64, 8, distribution, device=device)
    assert hashlib.sha256(matrix.cpu().numpy().tobytes()).hexdigest() == digest


@kernel_case
@pytest.mark.parametrize(
    ("rows", "rank", "distribution", "dtype"),
    [(37, 5, "gaussian", torch.float32), (130, 33, "rademacher", torch.float32), (50, 20, "gaussian", torch.bfloat16)],
)
def test_triton_generator_is_bit_identical_to_the_reference(device, rows, rank, distribution, dtype):
    key = kernels.StreamKey.derive(2**40 + 5, 17, 3)
    made = kernels.seeded_matrix(key, rows, rank, distribution, dtype, device=device)
    assert torch.equal(made.cpu(), seeded.seeded_matrix(key, rows, rank, distribution, dtype))


@kernel_case
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_fused_kernels_build_the_same_matrix_in_registers(device, distribution):
    """Projecting the identity returns P^T: exactly under the interpreter; compiled, tf32x3 keeps
    an entry's high and low tf32 parts, which lose at most 2**-20 of it (see DOT_ERROR)."""
    basis = SeededMatrix(kernels.StreamKey.derive(3, 4, 5), 40, 24, distribution)
    transposed = kernels.project(torch.eye(40, device=device), basis, "left")
    expected = seeded.seeded_matrix(basis.key, 40, 24, distribution).t()
    if INTERPRETED:
        assert torch.equal(transposed.cpu(), expected)
    else:
        assert_within(transposed, expected, expected.abs(), 2.0**-19)


# --- projection and reconstruction -----------------------------------------------------------

PROJECT_CASES = [
    # m, n, rank, side, gradient dtype, basis, with a residual
    (67, 45, 5, "left", torch.float32, "gaussian", False),
    (45, 67, 5, "right", torch.float32, "rademacher", False),
    (130, 33, 20, "left", torch.bfloat16, "gaussian", False),
    (40, 150, 17, "right", torch.bfloat16, "stored", False),
    (300, 24, 7, "left", torch.float32, "stored", True),  # the 300 rows split across programs
    (20, 340, 6, "right", torch.bfloat16, "gaussian", True),
    (48, 20, 512, "left", torch.float32, "gaussian", False),  # many rank blocks
]


@kernel_case
@pytest.mark.parametrize(("m", "n", "rank", "side", "dtype", "kind", "with_residual"), PROJECT_CASES)
def test_projection_matches_the_reference(device, m, n, rank, side, dtype, kind, with_residual):
    grad = randn(m, n, seed=1, dtype=dtype, device=device)
    residual = randn(m, n, seed=2, device=device) if with_residual else None
    reduced = kernels.reduced_dim(grad.shape, side)
    basis = make_basis(kind, reduced, rank, device)
    result = kernels.project(grad, basis, side, residual)
    expected = projection.project_torch(grad.cpu(), make_basis(kind, reduced, rank, torch.device("cpu")), side,
                                        None if residual is None else residual.cpu())
    assert result.dtype == torch.float32 and result.shape == expected.shape
    absolute = None if residual is None else residual.abs()
    magnitude = projection.project_torch(grad.abs(), dense(basis, device).abs(), side, absolute)
    assert_within(result, expected, magnitude, 2 * reduced * EPS + DOT_ERROR[torch.float32 if with_residual else dtype])


@kernel_case
def test_projection_is_the_same_bits_every_run_in_deterministic_mode(device):
    grad = randn(300, 24, seed=3, device=device)
    basis = make_basis("gaussian", 300, 7, device)
    split = kernels.project(grad, basis, "left")
    torch.use_deterministic_algorithms(True)
    try:
        runs = [kernels.project(grad, basis, "left") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0], runs[1])
    magnitude = projection.project_torch(grad.abs(), dense(basis, device).abs(), "left")
    assert_within(split, runs[0], magnitude, 2 * 300 * EPS + DOT_ERROR[torch.float32])


@needs_triton
def test_splits_fill_the_device_but_not_in_deterministic_mode():
    meta = {"D": 4096, "L": 4096, "R": 32, "BLOCK_D": 64}
    device = torch.device("cpu")  # counts as 4 streaming multiprocessors
    assert projection._splits(meta, tiles=1, device=device) == 8
    assert projection._splits(meta, tiles=64, device=device) == 1
    assert projection._splits({**meta, "D": 300, "R": 7, "BLOCK_D": 16}, tiles=2, device=device) == 4
    torch.use_deterministic_algorithms(True)
    try:
        assert projection._splits(meta, tiles=1, device=device) == 1
    finally:
        torch.use_deterministic_algorithms(False)


RECONSTRUCT_CASES = [
    # m, n, rank, side, dtype of the output (or of G for feedback), basis, operation
    (67, 45, 5, "left", torch.float32, "gaussian", "reconstruct"),
    (45, 67, 5, "right", torch.float32, "stored", "reconstruct"),
    (130, 33, 20, "left", torch.bfloat16, "gaussian", "add"),
    (50, 70, 40, "right", torch.float32, "rademacher", "add"),
    (300, 24, 7, "left", torch.bfloat16, "stored", "feedback"),
    (33, 130, 20, "right", torch.float32, "gaussian", "feedback"),
]


@kernel_case
@pytest.mark.parametrize(("m", "n", "rank", "side", "dtype", "kind", "operation"), RECONSTRUCT_CASES)
def test_reconstruction_matches_the_reference(device, m, n, rank, side, dtype, kind, operation):
    reduced = kernels.reduced_dim((m, n), side)
    coeffs = randn(*((rank, n) if side == "left" else (m, rank)), seed=4, device=device)
    out = randn(m, n, seed=5, dtype=dtype, device=device)
    grad, residual = randn(m, n, seed=6, dtype=dtype, device=device), randn(m, n, seed=7, device=device)
    basis = make_basis(kind, reduced, rank, device)
    cpu_basis = make_basis(kind, reduced, rank, torch.device("cpu"))
    if operation == "reconstruct":
        result = kernels.reconstruct(coeffs, basis, side)
        expected = reconstruction.reconstruct_torch(coeffs.cpu(), cpu_basis, side)
    elif operation == "add":
        result = kernels.reconstruct_add_(out.clone(), coeffs, basis, -0.5, side)
        expected = reconstruction.reconstruct_add_torch(out.cpu().clone(), coeffs.cpu(), cpu_basis, -0.5, side)
    else:
        result = kernels.feedback_residual(grad, residual, coeffs, basis, side)
        expected = reconstruction.feedback_residual_torch(grad.cpu(), residual.cpu(), coeffs.cpu(), cpu_basis, side)
    assert result.dtype == expected.dtype and result.shape == expected.shape
    spread = reconstruction.reconstruct_torch(coeffs.abs(), dense(basis, device).abs(), side)  # sum of |p c|
    magnitude = {
        "reconstruct": spread,
        "add": 0.5 * spread + out.abs(),
        "feedback": spread + grad.abs() + residual.abs(),
    }[operation]
    # fp32: the rank-term dot products, plus up to two more fp32 additions on each side.
    error = BF16_OUTPUT_ERROR if result.dtype == torch.bfloat16 else 2 * (rank + 2) * EPS + DOT_ERROR[torch.float32]
    assert_within(result, expected, magnitude, error)


@kernel_case
def test_reconstruct_add_works_in_place(device):
    out = randn(40, 30, seed=8, device=device)
    before = out.clone()
    coeffs = randn(6, 30, seed=9, device=device)
    returned = kernels.seeded_reconstruct_add_(out, coeffs, kernels.StreamKey.derive(1, 2, 3), 0.25, "left")
    assert returned is out and not torch.equal(out, before)


@kernel_case
@pytest.mark.parametrize("side", ["left", "right"])
def test_seeded_entry_points_match_the_reference(device, side):
    key = kernels.StreamKey.derive(11, 0, 4)
    grad = randn(36, 28, seed=10, device=device)
    result = kernels.seeded_project(grad, key, 6, side, "rademacher")
    with kernels.backend("torch"):
        expected = kernels.seeded_project(grad.cpu(), key, 6, side, "rademacher")
    reduced = kernels.reduced_dim(grad.shape, side)
    absolute_basis = dense(SeededMatrix(key, reduced, 6, "rademacher"), device).abs()
    magnitude = projection.project_torch(grad.abs(), absolute_basis, side)
    assert_within(result, expected, magnitude, 2 * reduced * EPS + DOT_ERROR[torch.float32])


# --- int8 ------------------------------------------------------------------------------------


@kernel_case
@pytest.mark.parametrize("shape", [(5, 37), (3, 1), (8, 300), (4, 3, 5)])
def test_int8_quantisation_is_bit_identical_to_the_reference(device, shape):
    coeffs = randn(*shape, seed=12, device=device) * 3
    coeffs[1] = 0  # an all-zero row: scale 0, values 0
    values, scales = kernels.quantize_rows(coeffs)
    expected_values, expected_scales = quant.quantize_rows_torch(coeffs.cpu())
    assert torch.equal(values.cpu(), expected_values) and torch.equal(scales.cpu(), expected_scales)
    restored = kernels.dequantize_rows(values, scales)
    assert torch.equal(restored.cpu(), quant.dequantize_rows_torch(expected_values, expected_scales))


# --- the default method's votes --------------------------------------------------------------


@kernel_case
@pytest.mark.parametrize("numel, per_chunk", [(1000, 4), (100, 7), (513, 1), (256, 16)])
@pytest.mark.parametrize("momentum_dtype", [None, torch.float32, torch.bfloat16])
def test_top_votes_are_bit_identical_to_the_reference(device, numel, per_chunk, momentum_dtype):
    """Distinct magnitudes, so the picks are the same positions in the same (descending) order."""
    chunk = min(256, numel)
    grad = randn(numel, seed=30)
    momentum = None if momentum_dtype is None else randn(numel, seed=31, dtype=momentum_dtype)
    got = kernels.top_votes(grad.to(device), None if momentum is None else momentum.to(device), 0.9, chunk, per_chunk)
    expected = votes.top_votes_torch(grad, momentum, 0.9, chunk, per_chunk)
    for actual, wanted in zip(got, expected):
        assert torch.equal(actual.cpu(), wanted)


@kernel_case
def test_top_votes_send_a_zero_code_for_an_exact_zero(device):
    grad = torch.zeros(300)
    grad[7], grad[290] = -2.0, 3.0
    positions, codes, rest = kernels.top_votes(grad.to(device), None, 0.9, 256, 2)
    assert positions[:, 0].tolist() == [7, 290 - 256] and codes[:, 0].tolist() == [0, 2]
    assert codes[:, 1].tolist() == [1, 1]  # the second pick of each chunk is a zero: no vote
    assert not rest.cpu().any()


def random_votes(workers: int, chunks: int, per_chunk: int, chunk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct positions per worker and chunk (as a top-k sends them), codes 0, 1 or 2."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.stack([
        torch.stack([torch.randperm(chunk, generator=generator)[:per_chunk] for _ in range(chunks)])
        for _ in range(workers)
    ]).to(torch.uint8)
    codes = torch.randint(0, 3, positions.shape, generator=generator, dtype=torch.uint8)
    return positions, codes


@kernel_case
@pytest.mark.parametrize("numel, per_chunk, workers", [(1000, 4, 3), (100, 7, 2), (256, 1, 5)])
def test_vote_mean_is_bit_identical_to_the_reference(device, numel, per_chunk, workers):
    chunk = min(256, numel)
    positions, codes = random_votes(workers, -(-numel // chunk), per_chunk, chunk, seed=32)
    mean = kernels.vote_mean(positions.to(device), codes.to(device), chunk, numel, workers)
    assert torch.equal(mean.cpu(), votes.vote_mean_torch(positions, codes, chunk, numel, workers))


@kernel_case
def test_vote_mean_reads_workers_from_strided_rows_of_a_gather(device):
    """Each worker's votes sit in its own row of the all_gather output, between other parameters' bytes."""
    positions, codes = random_votes(3, 4, 4, 256, seed=33)
    rows = torch.zeros(3, 100, dtype=torch.uint8)
    rows[:, 10:26], rows[:, 40:56] = positions.view(3, 16), codes.view(3, 16)
    rows = rows.to(device)
    mean = kernels.vote_mean(rows[:, 10:26].view(3, 4, 4), rows[:, 40:56].view(3, 4, 4), 256, 1000, 3)
    assert torch.equal(mean.cpu(), votes.vote_mean_torch(positions, codes, 256, 1000, 3))


# --- the compressors, end to end on the kernels ----------------------------------------------

COMPRESSOR_SPECS = [
    CompressionSpec(basis="seeded", rank=4, dense_threshold=1),
    CompressionSpec(basis="seeded", rank=3, distribution="rademacher", payload="int8", dense_threshold=1),
    CompressionSpec(basis="svd", rank=4, dense_threshold=1),
    CompressionSpec(basis="svd", rank=3, payload="int8", error_feedback=False, dense_threshold=1),
    CompressionSpec(basis="power", rank=3, payload="int8", dense_threshold=1),
    CompressionSpec(basis="sparse_momentum", per_chunk=4, error_feedback=False, dense_threshold=1),  # its momentum is its feedback
]


@kernel_case
@pytest.mark.parametrize("spec", COMPRESSOR_SPECS, ids=lambda spec: f"{spec.basis}-{spec.payload}")
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_compressors_on_the_kernels_match_the_torch_path(device, spec, shape):
    """Each step starts both compressors from the same state, so differences cannot pile up.

    fp32: 1e-4 of the largest value covers the rounding bounds above at these sizes. int8: a
    coefficient that lands within rounding of a half step may round the other way: one step.
    """
    on_kernels = build_compressor(spec, torch.Size(shape), param_id=3, seed=7)
    on_torch = build_compressor(spec, torch.Size(shape), param_id=3, seed=7)
    sent_total, grad_total = torch.zeros(shape), torch.zeros(shape)
    for step in range(3):
        grad = randn(*shape, seed=20 + step)
        for compressor in (on_kernels, on_torch):
            compressor.begin_step(step)
        if on_torch.needs_shared_basis(step):
            basis = on_torch.propose_basis(grad)  # one worker proposes, every worker sets it
            on_torch.set_basis(basis)
            on_kernels.set_basis(basis.to(device))
        coeffs = on_kernels.decode(on_kernels.encode(grad.to(device)))
        sent = on_kernels.reconstruct(coeffs)
        with kernels.backend("torch"):
            expected_coeffs = on_torch.decode(on_torch.encode(grad))
            expected_sent = on_torch.reconstruct(coeffs.cpu())
        int8_step = expected_coeffs.abs().amax(dim=1, keepdim=True) / 127 if spec.payload == "int8" else 0
        assert ((coeffs.cpu() - expected_coeffs).abs() <= int8_step + 1e-4 * expected_coeffs.abs().max()).all()
        assert torch.allclose(sent.cpu(), expected_sent, atol=1e-4 * expected_sent.abs().max())
        on_kernels.accept_mean(coeffs)  # a power-step basis takes its next factor from the mean
        on_kernels.commit()
        state = on_kernels.state_dict()
        on_torch.load_state_dict({key: value.cpu() if torch.is_tensor(value) else value for key, value in state.items()})
        sent_total += sent.cpu()
        grad_total += grad
    if spec.error_feedback:  # what was sent plus what is still owed is every gradient
        assert torch.allclose(sent_total + on_kernels.residual.cpu(), grad_total, atol=1e-4)


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="the parent run checks this")
def test_the_default_trains_to_the_same_bits_on_the_vote_kernels_as_on_torch():
    """Two workers of the default method, its hot path forced onto the Triton kernels (interpreted, on
    CPU tensors) and onto the torch references: the same parameters, bit for bit."""
    digests = {}
    for backend, extra in (("triton", {"TRITON_INTERPRET": "1"}), ("torch", {})):
        env = {key: value for key, value in os.environ.items() if key not in ("RANK", "TRITON_INTERPRET")}
        command = ["disttrain", "train", "--nproc", "2", "--steps", "5", "--eval-every", "5", *TINY_FLAGS]  # one round
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**env, dispatch.ENV_VAR: backend, **extra})
        assert result.returncode == 0, result.stderr[-3000:]
        digests[backend] = last_json_line(result.stdout)["parameter_digest"]
    assert digests["triton"] == digests["torch"]


# --- dispatch, and the library without triton ------------------------------------------------


def test_auto_picks_triton_only_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert not dispatch.use_triton(torch.device("cpu"))
    assert dispatch.use_triton(torch.device("cuda")) == _triton.available()


def test_the_context_manager_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.requested() == "triton"
    with kernels.backend("torch"):
        assert dispatch.requested() == "torch"
        assert not dispatch.use_triton(torch.device("cuda"))
    assert dispatch.requested() == "triton"


def test_an_unknown_backend_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="DISTTRAIN_KERNELS: unknown kernel backend 'cuda'"):
        dispatch.requested()
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        with kernels.backend("fast"):
            pass


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="under the interpreter the Triton backend does run on CPU")
def test_forcing_triton_on_cpu_without_the_interpreter_says_how():
    with kernels.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.project(torch.zeros(8, 4), torch.zeros(8, 2), "left")


def test_dispatched_functions_keep_the_reference_signature():
    assert kernels.project.__name__ == "project"
    assert list(inspect.signature(kernels.project).parameters) == ["grad", "basis", "side", "residual"]


@pytest.mark.skipif(INTERPRETED, reason="the parent run checks this")
def test_the_library_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from disttrain import kernels\n"
        "from disttrain.compress import CompressionSpec, build_compressor\n"
        "spec = CompressionSpec(basis='seeded', rank=2, payload='int8', dense_threshold=1)\n"
        "compressor = build_compressor(spec, torch.Size((16, 8)), 0, 0)\n"
        "compressor.begin_step(0)\n"
        "compressor.reconstruct(compressor.decode(compressor.encode(torch.randn(16, 8))))\n"
        "try:\n"
        "    with kernels.backend('triton'):\n"
        "        kernels.project(torch.zeros(8, 4), torch.zeros(8, 2), 'left')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs triton: pip install 'disttrain[gpu]'" in result.stdout


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_kernel_cases_pass_under_the_interpreter():
    """This file again in a fresh process, where TRITON_INTERPRET=1 comes before the first import."""
    env = {key: value for key, value in os.environ.items() if key != dispatch.ENV_VAR}
    env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=280)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
