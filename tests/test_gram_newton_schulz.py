"""The Gram form of the orthogonalizers ("gram_newton_schulz", "gram_polar_express"): the same
polynomial as the plain iteration, evaluated on the r x r Gram matrix. Checked against the
documented singular value ranges, the plain form, a FLOP counter, torch.compile, and the
invariants the other orthogonalizers keep (scale, zero, NaN/inf). Its distance to the float64
polynomial is checked with the other orthogonalizers', in test_normuon.py."""
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import normuon
from normuon import NEWTON_SCHULZ_COEFFICIENTS, NorMuon, orthogonalize
from test_normuon import spectrum_test_matrices

GRAM = ["gram_newton_schulz", "gram_polar_express"]


@pytest.fixture
def gram_on_every_shape(monkeypatch):
    """Square matrices take the plain iteration (the faster there); this makes them take the
    Gram form too, so that its accuracy is checked on them."""
    monkeypatch.setattr(normuon, "GRAM_MIN_ASPECT", 1.0)


def test_gram_form_singular_values_lie_in_the_documented_ranges(gram_on_every_shape):
    # normuon.py's: [0.5, 1.21] for Muon's quintic, near 1 for Polar Express, for directions
    # within two decades of the largest (the matrices here: wide, tall and square)
    for U in spectrum_test_matrices():
        s = torch.linalg.svdvals(orthogonalize(U, "gram_newton_schulz", 5).double())
        assert 0.5 < s.min() and s.max() < 1.21, (U.shape, s.min(), s.max())
        s = torch.linalg.svdvals(orthogonalize(U, "gram_polar_express", 5).double())
        assert 0.8 < s.min() and s.max() < 1.2, (U.shape, s.min(), s.max())


@pytest.mark.parametrize("orthogonalizer", GRAM)
def test_each_shape_takes_the_form_its_aspect_ratio_chooses(orthogonalizer):
    plain_name = orthogonalizer.removeprefix("gram_")
    gen = torch.Generator().manual_seed(3)
    for shape in [(40, 40), (40, 60), (60, 40)]:       # below GRAM_MIN_ASPECT: the plain one
        U = torch.randn(shape, generator=gen)
        assert torch.equal(orthogonalize(U, orthogonalizer), orthogonalize(U, plain_name))
    for shape in [(40, 80), (80, 40), (2, 30, 90)]:    # at or above it: the Gram form
        U = torch.randn(shape, generator=gen)
        O, O_plain = orthogonalize(U, orthogonalizer), orthogonalize(U, plain_name)
        assert not torch.equal(O, O_plain) and O.shape == U.shape
        torch.testing.assert_close(O, O_plain, rtol=0, atol=0.05)


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (32, 160)])
def test_gram_iterations_flops_counts_what_torch_counts(shape):
    # torch's FLOP counter sees every matmul the Gram form runs; ours is a formula
    X = torch.randn(1, *shape)
    with FlopCounterMode(display=False) as counter:
        normuon.gram_iterations(X, [NEWTON_SCHULZ_COEFFICIENTS] * 5, 1.0)
    assert counter.get_total_flops() == normuon.gram_iterations_flops(*shape, 5)
    assert normuon.gram_iterations_flops(*shape) < normuon.newton_schulz_flops(*shape)
    # what the sharded optimizer balances its owners by: the form each shape takes
    assert normuon.orthogonalizer_flops("gram_newton_schulz", *shape) == counter.get_total_flops()
    for square in ("gram_newton_schulz", "newton_schulz"):
        assert normuon.orthogonalizer_flops(square, 40, 40) == normuon.newton_schulz_flops(40, 40)


@pytest.mark.parametrize("orthogonalizer", GRAM)
def test_gram_form_is_exactly_scale_invariant_by_powers_of_two(orthogonalizer):
    U = torch.randn(3, 20, 60, generator=torch.Generator().manual_seed(4))
    reference = orthogonalize(U, orthogonalizer)
    for exponent in (-100, -60, 40, 80, 120):
        scaled = orthogonalize(U * 2.0 ** exponent, orthogonalizer)
        assert torch.equal(scaled, reference), exponent


@pytest.mark.parametrize("orthogonalizer", GRAM)
def test_zero_stays_zero_and_non_finite_stays_in_its_own_matrix(orthogonalizer):
    gen = torch.Generator().manual_seed(5)
    good = torch.randn(2, 16, 48, generator=gen)
    bad = torch.randn(3, 16, 48, generator=gen)
    bad[0] = 0.0
    bad[1, 3, 7] = math.nan
    bad[2, 0, 0] = math.inf
    O = orthogonalize(torch.stack([good[0], *bad, good[1]]), orthogonalizer)
    assert torch.equal(O[1], torch.zeros(16, 48))
    assert torch.isnan(O[2]).all() and torch.isnan(O[3]).all()
    assert torch.equal(O[[0, 4]], orthogonalize(good, orthogonalizer))


def test_gram_orthogonalizer_steps_close_to_the_plain_one_in_the_optimizer():
    # The same momentum, second moments and step sizes around it: after four steps the
    # weights differ by the orthogonalizers' rounding, not by a different update.
    def run(orthogonalizer):
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(24, 96), nn.Tanh(), nn.Linear(96, 24))
        start = [p.detach().clone() for p in model.parameters()]
        opt = NorMuon(normuon.param_groups(model, head=()), lr=0.02,
                      orthogonalizer=orthogonalizer)
        for step in range(4):
            x = torch.randn(64, 24, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() - s for p, s in zip(model.parameters(), start)]

    for gram, plain in zip(run("gram_newton_schulz"), run("newton_schulz")):
        assert (gram - plain).norm() <= 0.05 * plain.norm()


def test_compiled_gram_form_agrees_with_eager():
    # what DistributedNorMuon compiles on its matrices' owners: normuon.orthogonalize itself
    compiled = torch.compile(orthogonalize, fullgraph=True)
    gen = torch.Generator().manual_seed(7)
    for shape in [(2, 24, 96), (2, 96, 24)]:
        U = torch.randn(shape, generator=gen).bfloat16()
        eager = orthogonalize(U, "gram_newton_schulz")
        # inductor may fuse the float32 elementwise steps and round the output differently:
        # bf16 precision, one rounding step of the largest entries
        torch.testing.assert_close(compiled(U, "gram_newton_schulz"), eager,
                                   rtol=0, atol=2 ** -8)
