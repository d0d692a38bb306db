"""LeanAdamW: Adam's update from a bf16 first moment and a factored second moment, in a quarter of AdamW's state."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disttrain.optim import LeanAdamW, optimizer_state_bytes

LR, BETAS, EPS = 1e-2, (0.9, 0.95), 1e-8
BF16_ULP = 2.0**-8  # relative rounding of the bf16 first moment


def both_optimizers(shape: tuple[int, ...], weight_decay: float = 0.0, seed: int = 0):
    """Two copies of one parameter, one under torch AdamW and one under LeanAdamW."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    reference, lean = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    return (
        reference, torch.optim.AdamW([reference], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay),
        lean, LeanAdamW([lean], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay),
    )


def step_both(pairs, grad: torch.Tensor) -> None:
    reference, reference_opt, lean, lean_opt = pairs
    reference.grad, lean.grad = grad.clone(), grad.clone()
    reference_opt.step()
    lean_opt.step()


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 30), st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_on_gradients_whose_square_is_rank_one_a_matrix_moves_as_under_adamw(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    pairs = both_optimizers((rows, cols), seed=seed)
    left, right = torch.randn(rows, 1, generator=generator), torch.randn(1, cols, generator=generator)
    for scale in (1.0, 0.5, 2.0):  # g**2 stays rank one, so the factored second moment is exact
        step_both(pairs, scale * left * right)
    reference, _, lean, _ = pairs
    moved = (reference.detach() - lean.detach()).abs().max()
    assert moved <= 3 * LR * 4 * BF16_ULP  # three steps of at most ~lr each, m rounded to bf16


def test_a_vector_parameter_moves_as_under_adamw_up_to_the_bf16_first_moment():
    pairs = both_optimizers((50,))
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        step_both(pairs, torch.randn(50, generator=generator))
    reference, _, lean, _ = pairs
    assert torch.allclose(reference.detach(), lean.detach(), atol=10 * LR * 4 * BF16_ULP)


def test_on_general_gradients_the_update_keeps_adams_direction_and_size():
    pairs = both_optimizers((64, 48))
    start = pairs[0].detach().clone()
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        step_both(pairs, torch.randn(64, 48, generator=generator) * torch.linspace(0.1, 3.0, 48))
    reference_move, lean_move = pairs[0].detach() - start, pairs[2].detach() - start
    cosine = torch.nn.functional.cosine_similarity(reference_move.reshape(-1), lean_move.reshape(-1), dim=0)
    assert cosine > 0.85  # the factored estimate smooths the noise of each entry's own g**2
    assert 0.8 < lean_move.norm() / reference_move.norm() < 1.25


def test_a_matrix_keeps_a_quarter_of_adamws_state_bytes():
    pairs = both_optimizers((256, 128))
    step_both(pairs, torch.randn(256, 128))
    reference_bytes, lean_bytes = optimizer_state_bytes(pairs[1]), optimizer_state_bytes(pairs[3])
    moments = 256 * 128
    assert reference_bytes == 8 * moments + 4  # exp_avg and exp_avg_sq in fp32, the step counter
    assert lean_bytes == 2 * moments + 4 * (256 + 128) + 4  # bf16 exp_avg, row and column means, the step


def test_the_first_moment_is_kept_in_bf16_and_the_second_factored():
    _, _, lean, optimizer = both_optimizers((8, 6))
    lean.grad = torch.ones(8, 6)
    optimizer.step()
    state = optimizer.state[lean]
    assert state["exp_avg"].dtype == torch.bfloat16
    assert state["row_mean_sq"].shape == (8,) and state["col_mean_sq"].shape == (6,)
    assert "exp_avg_sq" not in state


def test_weight_decay_is_decoupled_from_the_gradient():
    _, _, lean, optimizer = both_optimizers((4, 4), weight_decay=0.5)
    before = lean.detach().clone()
    lean.grad = torch.zeros(4, 4)
    optimizer.step()
    assert torch.equal(lean.detach(), before * (1 - LR * 0.5))


def test_a_reloaded_state_keeps_its_bf16_first_moment_and_takes_the_same_steps():
    _, _, lean, optimizer = both_optimizers((12, 5))
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        lean.grad = torch.randn(12, 5, generator=generator)
        optimizer.step()
    copy_param = torch.nn.Parameter(lean.detach().clone())
    reloaded = LeanAdamW([copy_param], lr=LR, betas=BETAS, eps=EPS)
    reloaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert reloaded.state[copy_param]["exp_avg"].dtype == torch.bfloat16
    for _ in range(3):
        grad = torch.randn(12, 5, generator=generator)
        lean.grad, copy_param.grad = grad.clone(), grad.clone()
        optimizer.step()
        reloaded.step()
    assert torch.equal(lean.detach(), copy_param.detach())


@pytest.mark.parametrize("bad", [{"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}, {"lr": -1.0}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(ValueError):
        LeanAdamW([torch.nn.Parameter(torch.zeros(2))], **bad)

