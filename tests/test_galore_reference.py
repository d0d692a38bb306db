"""disttrain's single-worker `svd-projected` against the real GaLore optimizer, PyPI galore-torch 1.0.

galore-torch comes with the [bench] extra, so the test install has it; elsewhere the test is
skipped unless it is installed. Both optimizers train copies of one small MLP on the same gradients, with the same
rank, refresh interval, learning rate, betas, eps, weight decay and update scale, through several
basis refreshes. The one difference between them is the sign of the singular vectors: disttrain
flips each one so that its largest-magnitude entry is positive (`canonical_signs`), and
galore-torch keeps the signs LAPACK returns. Both keep Adam's moments across a refresh, so where
a vector's LAPACK sign changes from one basis to the next, galore-torch's kept moments then push
against the flipped basis vector.

- With galore-torch's projector given disttrain's signs, the two agree at every step.
- As published, they agree until the first refresh at which a LAPACK sign changes relative to
  the previous basis, and depart from then on.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from distributed import run_workers

from disttrain.comm import CompressedAllReduce
from disttrain.compress.svd import canonical_signs
from disttrain.methods import get_method, with_overrides
from disttrain.train.config import OptimConfig, TrainConfig
from disttrain.train.optimizer import build_optimizer

pytest.importorskip(
    "galore_torch",
    reason="the GaLore reference comparison needs PyPI galore-torch: pip install galore-torch",
)

METHOD = "svd-projected"  # GaLore: SVD basis, Adam moments in the subspace, kept across a refresh
RANK, REFRESH, STEPS = 4, 3, 12  # bases at steps 0, 3, 6 and 9
LR, WEIGHT_DECAY, SCALE = 1e-2, 0.1, 0.25  # SCALE: GaLore's alpha (the method's own is 1)
DENSE_THRESHOLD = 1024  # the two hidden weights (64 x 16, 64 x 64) are projected; the 8 x 64 head goes dense
AGREE, DEPART = 1e-6, 1e-3  # largest weight difference: agreement, and a departure


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 16, generator=generator), torch.randint(0, 8, (32,), generator=generator)


def canonical_rows(matrix: torch.Tensor) -> torch.Tensor:
    """disttrain's sign convention for galore-torch's 'right' projector, whose rows are the vectors."""
    return canonical_signs(matrix.t()).t().contiguous()


def galore_optimizer(model: torch.nn.Module, projected: list[torch.nn.Parameter], config: TrainConfig):
    from galore_torch import GaLoreAdamW

    o = config.optim
    others = [p for p in model.parameters() if all(p is not q for q in projected)]
    groups = [
        {"params": others},
        # proj_type "std" projects a tall (m >= n) gradient on its top right singular vectors, reducing n:
        # disttrain's side="right" on the same weights.
        {"params": projected, "rank": RANK, "update_proj_gap": REFRESH, "scale": SCALE, "proj_type": "std"},
    ]
    return GaLoreAdamW(
        groups, lr=config.peak_lr, betas=(o.beta1, o.beta2), eps=1e-8, weight_decay=o.weight_decay,
        no_deprecation_warning=True,
    )


def compare(rank: int, world: int, aligned: bool) -> dict:
    """Train both optimizers on disttrain's gradients; per step, the largest weight difference and
    whether some basis vector's galore-torch sign changed, relative to disttrain's, at a refresh."""
    from galore_torch.galore_projector import GaLoreProjector

    method = with_overrides(get_method(METHOD), rank=RANK, refresh_every=REFRESH, side="right", dense_threshold=DENSE_THRESHOLD)
    config = TrainConfig(method=METHOD, optim=OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, galore_scale=SCALE))
    ours = make_model()
    theirs = copy.deepcopy(ours)
    reducer = CompressedAllReduce(ours.parameters(), method.compression, seed=0, overlap=False)
    optimizer = build_optimizer(ours.parameters(), method, config)
    optimizer.attach(reducer)  # as the per-step exchange attaches it
    assert optimizer.defaults["eps"] == 1e-8 and optimizer.defaults["refresh_moments"] == "keep"
    projected = [q for p, q in zip(ours.parameters(), theirs.parameters()) if method.compression.compresses(p.shape)]
    assert [tuple(p.shape) for p in projected] == [(64, 16), (64, 64)]
    reference = galore_optimizer(theirs, projected, config)

    lapack = GaLoreProjector.get_orthogonal_matrix

    def with_disttrain_signs(self, weights, rank, type):  # noqa: A002 (galore-torch's name)
        assert type == "right", "every projected weight here is tall: galore-torch projects it on the right"
        return canonical_rows(lapack(self, weights, rank, type))

    if aligned:
        GaLoreProjector.get_orthogonal_matrix = with_disttrain_signs
    differences, flipped, last_signs = [], [], None
    try:
        for step in range(STEPS):
            for p in ours.parameters():
                p.grad = None
            reducer.start_step(step)
            inputs, targets = batch(step)
            torch.nn.functional.cross_entropy(ours(inputs), targets).backward()
            reducer.finish()
            for p, q in zip(ours.parameters(), theirs.parameters()):
                q.grad = p.grad.clone()  # the same gradients for both
            optimizer.step()
            reducer.commit()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference.step()
            differences.append(max((p - q).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters())))
            # +1 where galore-torch's vector has disttrain's sign, -1 where it has the opposite one
            signs = torch.cat([
                torch.sign((reference.state[q]["projector"].ortho_matrix * compressor.basis_matrix().t()).sum(dim=1))
                for q, compressor in zip(projected, (c for p, c in zip(ours.parameters(), reducer.compressors)
                                                     if method.compression.compresses(p.shape)))
            ])
            assert bool((signs != 0).all())
            flipped.append(step % REFRESH == 0 and last_signs is not None and not torch.equal(signs, last_signs))
            last_signs = signs
    finally:
        GaLoreProjector.get_orthogonal_matrix = lapack
    return {"differences": differences, "flipped": flipped}


def test_galore_torch_with_disttrain_signs_is_disttrain_through_every_refresh():
    result = run_workers(compare, 1, True)[0]
    assert not any(result["flipped"])  # aligned: galore-torch's vectors carry disttrain's signs
    assert max(result["differences"]) < AGREE, result["differences"]


def test_galore_torch_as_published_departs_at_the_first_refresh_that_flips_a_lapack_sign():
    result = run_workers(compare, 1, False)[0]
    differences, flipped = result["differences"], result["flipped"]
    assert any(flipped), "no LAPACK sign changed between bases: the data no longer tests the departure"
    first = flipped.index(True)
    assert first > 0 and max(differences[:first]) < AGREE, differences
    assert min(differences[first:]) > DEPART, differences
