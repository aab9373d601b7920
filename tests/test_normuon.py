"""normuon.py against independent expectations: a plain float64 reference of the update in
normuon.py's docstring, torch.optim.Muon and torch.optim.AdamW as peers, exact SVDs, and
invariants."""
import io
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normuon
from normuon import (NEWTON_SCHULZ_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS, NorMuon,
                     orthogonalize, param_groups, svd_polar)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def polar_by_eigh(U: torch.Tensor) -> torch.Tensor:
    """U (U^T U)^(-1/2) for a full-rank U, through a symmetric eigendecomposition (no SVD)."""
    tall = U.shape[0] >= U.shape[1]
    gram = U.T @ U if tall else U @ U.T
    eigenvalues, Q = torch.linalg.eigh(gram)
    inverse_sqrt = Q @ torch.diag(eigenvalues.rsqrt()) @ Q.T
    return U @ inverse_sqrt if tall else inverse_sqrt @ U


def reference_run(W0, grads, *, algorithm, lr, weight_decay, momentum, beta2, eps, nesterov,
                  adjust_lr):
    """The update of normuon.py's docstring written out plainly: one matrix, float64, neuron
    by neuron."""
    W = W0.double().clone()
    m, n = W.shape
    M = torch.zeros(m, n, dtype=torch.float64)
    v = [0.0] * m
    for G in grads:
        G = G.double()
        M = momentum * M + (1 - momentum) * G
        U = momentum * M + (1 - momentum) * G if nesterov else M
        O = polar_by_eigh(U)
        if algorithm == "normuon":
            rows = []
            for i in range(m):
                v[i] = beta2 * v[i] + (1 - beta2) * float((O[i] ** 2).sum()) / n
                rows.append(O[i] / (math.sqrt(v[i]) + eps))
            O_hat = torch.stack(rows)
        else:
            O_hat = O
        if adjust_lr == "match_rms_adamw":
            lr_hat = 0.2 * lr * math.sqrt(m * n) / float(torch.linalg.norm(O_hat))
        else:
            O_hat = O_hat * float(torch.linalg.norm(O)) / float(torch.linalg.norm(O_hat))
            lr_hat = lr * math.sqrt(max(1.0, m / n))
        W = W - lr * weight_decay * W - lr_hat * O_hat
    return W


def run_optimizer(params, grads_per_step, make_opt):
    """Step an optimizer over `params` with the given gradients; returns the optimizer."""
    opt = make_opt(params)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone().to(p.dtype)
        opt.step()
    return opt


def random_grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(steps)]


# ----------------------------------------------------------------------------- plain reference

@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
def test_matches_plain_reference_with_svd(shape, nesterov, adjust_lr, algorithm):
    hyper = dict(algorithm=algorithm, lr=0.05, weight_decay=0.1, momentum=0.9, beta2=0.95,
                 eps=1e-8, nesterov=nesterov, adjust_lr=adjust_lr)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = random_grads([shape], steps=5)
    expected = reference_run(W0, [g[0] for g in grads], **hyper)

    def make(params):
        return NorMuon(params, orthogonalizer="svd", **hyper)

    # float32 parameters (float32 state): 1e-6 relative on the parameters
    p32 = nn.Parameter(W0.float().clone())
    run_optimizer([p32], grads, make)
    torch.testing.assert_close(p32.detach().double(), expected, rtol=1e-6, atol=1e-6)

    # float64 parameters keep float64 state: the *change* agrees to 1e-9, which would expose
    # any deviation of the update hidden under the parameters' own magnitude
    p64 = nn.Parameter(W0.clone())
    run_optimizer([p64], grads, make)
    change, expected_change = p64.detach() - W0, expected - W0
    error = (change - expected_change).abs().max() / expected_change.abs().max()
    assert error < 1e-9, f"relative error of the update {error:.2e}"


# ----------------------------------------------------------------------------- peers

@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_algorithm_matches_torch_optim_muon(shape):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    row_scales = torch.logspace(-1, 1, shape[0])[:, None]   # where NorMuon departs from Muon
    grads = [[g * row_scales] for [g] in random_grads([shape], steps=6)]
    hyper = dict(lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True)

    ours = nn.Parameter(W0.clone())
    run_optimizer([ours], grads, lambda ps: NorMuon(
        ps, algorithm="muon", adjust_lr="original", orthogonalizer="newton_schulz", **hyper))
    peer = nn.Parameter(W0.clone())
    run_optimizer([peer], grads, lambda ps: torch.optim.Muon(ps, **hyper))

    our_change, peer_change = ours.detach() - W0, peer.detach() - W0
    relative = torch.linalg.norm(our_change - peer_change) / torch.linalg.norm(peer_change)
    # both orthogonalize in bf16 (8 bits of mantissa): agree to about 1%, and far better than
    # NorMuon differs from Muon
    assert relative < 0.02, relative
    normuon = nn.Parameter(W0.clone())
    run_optimizer([normuon], grads, lambda ps: NorMuon(ps, adjust_lr="original", **hyper))
    assert torch.linalg.norm(normuon.detach() - W0 - peer_change) > 5 * torch.linalg.norm(
        our_change - peer_change)


def test_adamw_group_matches_torch_optim_adamw():
    shapes = [(24, 8), (8,), ()]
    gen = torch.Generator().manual_seed(3)
    inits = [torch.randn(s, generator=gen) for s in shapes]
    grads = random_grads(shapes, steps=10)
    hyper = dict(lr=3e-3, betas=(0.8, 0.97), eps=1e-6, weight_decay=0.05)

    ours = [nn.Parameter(w.clone()) for w in inits]
    run_optimizer(ours, grads, lambda ps: NorMuon(ps, algorithm="adamw", **hyper))
    peer = [nn.Parameter(w.clone()) for w in inits]
    run_optimizer(peer, grads, lambda ps: torch.optim.AdamW(ps, **hyper))
    for a, b in zip(ours, peer):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- invariants

def unequal_row_gradient(m=96, n=32, seed=4):
    """A tall gradient whose rows differ in scale by 100x, like neurons of unequal activity."""
    gen = torch.Generator().manual_seed(seed)
    row_scales = torch.logspace(-1, 1, m)
    return row_scales[:, None] * torch.randn(m, n, generator=gen)


def first_update_rows(algorithm):
    G = unequal_row_gradient()
    W = nn.Parameter(torch.zeros_like(G))
    run_optimizer([W], [[G]], lambda ps: NorMuon(ps, lr=1.0, weight_decay=0.0,
                                                  algorithm=algorithm))
    return W.detach().norm(dim=1)


def test_normuon_first_update_has_equal_row_norms():
    row_norms = first_update_rows("normuon")
    assert (row_norms.max() - row_norms.min()) / row_norms.mean() < 1e-3


def test_muon_first_update_of_tall_matrix_has_unequal_row_norms():
    row_norms = first_update_rows("muon")
    assert row_norms.std() / row_norms.mean() > 0.1
    assert row_norms.max() / row_norms.min() > 2


@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
@pytest.mark.parametrize("orthogonalizer", ["newton_schulz", "polar_express", "svd"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (3, 8, 2, 2)])
def test_match_rms_adamw_update_rms_is_exactly_point_two_lr(algorithm, orthogonalizer, shape):
    lr = 0.03
    W0 = torch.randn(shape, dtype=torch.float64)
    W = nn.Parameter(W0.clone())
    opt = NorMuon([W], lr=lr, weight_decay=0.0, algorithm=algorithm,
                  orthogonalizer=orthogonalizer)
    for grads in random_grads([shape], steps=4):
        before = W.detach().clone()
        W.grad = grads[0].double()
        opt.step()
        rms = ((W.detach() - before) / lr).square().mean().sqrt()
        assert abs(rms.item() - 0.2) < 1e-10


def matrix_with_spectrum(m, n, decades, gen, dtype=torch.float32):
    """An (m, n) matrix of random singular vectors whose singular values fall evenly, in log,
    from 1 to 10^-decades."""
    r = min(m, n)
    left, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=dtype))
    right, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=dtype))
    return (left * torch.logspace(0, -decades, r, dtype=dtype)) @ right.T


def spectrum_test_matrices():
    """Matrices with chosen singular values, spread over two decades below the largest."""
    gen = torch.Generator().manual_seed(5)
    for m, n in [(256, 64), (64, 256), (128, 128)]:
        yield matrix_with_spectrum(m, n, 2, gen) * 7.0


def test_newton_schulz_singular_values_in_the_stated_range():
    # Muon's quintic is tuned for speed, not convergence: normuon.py states [0.5, 1.21] for
    # directions within two decades of the largest, rather than 1
    for U in spectrum_test_matrices():
        s = torch.linalg.svdvals(orthogonalize(U, "newton_schulz", 5).double())
        assert 0.5 < s.min() and s.max() < 1.21, (s.min(), s.max())


def test_polar_express_singular_values_near_one_and_closer_than_newton_schulz():
    for U in spectrum_test_matrices():
        s_pe = torch.linalg.svdvals(orthogonalize(U, "polar_express", 5).double())
        s_ns = torch.linalg.svdvals(orthogonalize(U, "newton_schulz", 5).double())
        assert 0.8 < s_pe.min() and s_pe.max() < 1.2, (s_pe.min(), s_pe.max())
        assert (s_pe - 1).abs().max() < (s_ns - 1).abs().max()


def polynomial_in(dtype, U, coefficients, input_scale):
    """The odd polynomial iteration written out plainly, every operation in `dtype`, on the
    short side: X = U/(scale*|U|_F), then X <- a*X + (b*A + c*A@A) @ X with A = X @ X^T."""
    tall = U.shape[0] > U.shape[1]
    X = (U.T if tall else U).to(dtype)
    X = X / (input_scale * torch.linalg.norm(X))
    for a, b, c in coefficients:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


@pytest.mark.parametrize("orthogonalizer", ["newton_schulz", "polar_express",
                                            "gram_newton_schulz", "gram_polar_express"])
def test_bf16_iteration_is_as_close_to_the_exact_polynomial_as_a_plain_bf16_loop(
        orthogonalizer, monkeypatch):
    # The same polynomial in float64 is the target. A plain loop in bf16 (how the published
    # implementations compute it) sets the rounding error to match: ours, which normalizes
    # inside the first iteration, must be no further from the float64 result than it; so
    # must the Gram form, here on the square matrix too (which it would leave to the plain one).
    monkeypatch.setattr(normuon, "GRAM_MIN_ASPECT", 1.0)
    if orthogonalizer.endswith("newton_schulz"):
        coefficients, input_scale = [NEWTON_SCHULZ_COEFFICIENTS] * 5, 1.0
    else:
        coefficients, input_scale = POLAR_EXPRESS_COEFFICIENTS, 1.02
    gen = torch.Generator().manual_seed(8)
    for m, n in [(192, 64), (64, 192), (96, 96)]:
        for decades in (0.3, 1, 3):
            U = matrix_with_spectrum(m, n, decades, gen, torch.float64).float()
            exact = polynomial_in(torch.float64, U.bfloat16().double(), coefficients,
                                  input_scale)

            def error(O):
                return (torch.linalg.norm(O.double() - exact) / torch.linalg.norm(exact)).item()

            O = orthogonalize(U, orthogonalizer, 5)
            plain = error(polynomial_in(torch.bfloat16, U, coefficients, input_scale))
            assert error(O) <= 1.1 * plain, ((m, n), decades, error(O), plain)
            if orthogonalizer.startswith("gram_"):   # the Gram form was measured, not the other
                assert not torch.equal(O, orthogonalize(U, orthogonalizer[5:], 5))


def test_svd_polar_drops_null_directions_of_rank_deficient_input():
    gen = torch.Generator().manual_seed(6)
    U = torch.randn(30, 5, generator=gen) @ torch.randn(5, 20, generator=gen)   # rank 5
    s = torch.linalg.svdvals(svd_polar(U).double())
    torch.testing.assert_close(s[:5], torch.ones(5, dtype=torch.float64))
    assert s[5:].abs().max() < 1e-6


@pytest.mark.parametrize("orthogonalizer", ["newton_schulz", "polar_express", "svd"])
def test_orthogonalize_batch_equals_one_matrix_at_a_time(orthogonalizer):
    U = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(7))
    batched = orthogonalize(U, orthogonalizer)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(U[i], orthogonalizer),
                                   rtol=2e-2, atol=2e-2)   # bf16 rounding of bmm vs mm
    if orthogonalizer == "svd":
        torch.testing.assert_close(batched[1].double(), polar_by_eigh(U[1].double()),
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- conv weights

@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_conv_weight_is_normalized_per_output_channel(adjust_lr):
    # (out, in, kh, kw) = (64, 4, 3, 3) is the matrix (64, 36): Muon's shape scale is
    # sqrt(64/36), not the sqrt(max(1, 3/3)) of the last two dims.
    conv0 = torch.randn(64, 4, 3, 3, generator=torch.Generator().manual_seed(8))
    grads = random_grads([(64, 4, 3, 3)], steps=4)
    conv = nn.Parameter(conv0.clone())
    conv_opt = run_optimizer([conv], grads, lambda ps: NorMuon(ps, lr=0.02, adjust_lr=adjust_lr))
    flat = nn.Parameter(conv0.reshape(64, 36).clone())
    run_optimizer([flat], [[g[0].reshape(64, 36)] for g in grads],
                  lambda ps: NorMuon(ps, lr=0.02, adjust_lr=adjust_lr))

    assert conv_opt.state[conv]["second_moment"].shape == (64,)
    torch.testing.assert_close(conv.detach().reshape(64, 36), flat.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("stored", [(12, 40), (12, 40, 3)], ids=["in_out", "in_out_k"])
def test_weight_stored_in_out_steps_as_its_neuron_matrix(stored, adjust_lr):
    # A weight stored (in, out, ...) with layout="in_out" (Conv1D, ConvTranspose) is the plain
    # reference's (out, in*k) matrix, moved back: rows there are the output neurons.
    hyper = dict(algorithm="normuon", lr=0.05, weight_decay=0.1, momentum=0.9, beta2=0.95,
                 eps=1e-8, nesterov=True, adjust_lr=adjust_lr)
    W0 = torch.randn(stored, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = random_grads([stored], steps=4)

    def neuron_rows(X):
        return X.movedim(1, 0).reshape(X.shape[1], -1)

    expected = reference_run(neuron_rows(W0), [neuron_rows(g[0]) for g in grads], **hyper)
    W = nn.Parameter(W0.clone())
    opt = run_optimizer([W], grads, lambda ps: NorMuon(ps, orthogonalizer="svd", layout="in_out",
                                                       **hyper))
    assert opt.state[W]["second_moment"].shape == (40,)
    torch.testing.assert_close(neuron_rows(W.detach()) - neuron_rows(W0),
                               expected - neuron_rows(W0), rtol=1e-9, atol=1e-12)


def test_a_layout_the_weight_cannot_have_is_refused_naming_it():
    W = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"shape \(4, 6\): layout 'experts_out_in' needs at "
                                         r"least 3 dims"):
        NorMuon([W], layout="experts_out_in")
    with pytest.raises(ValueError, match=r"blocks=3 must be an integer >= 1 that divides the 4 "):
        NorMuon([W], blocks=3)
    with pytest.raises(ValueError, match="unknown layout 'rows'"):
        NorMuon([W], layout="rows")
    with pytest.raises(ValueError, match="neuron_axis is now layout: 'in_out'"):
        NorMuon([{"params": [W], "neuron_axis": 1}])


@pytest.mark.parametrize("saved_axis, layout", [(None, "out_in"), (0, "out_in"), (1, "in_out")])
def test_state_dict_saved_before_layout_existed_still_loads(saved_axis, layout):
    # before `layout`: no neuron_axis key at first, then neuron_axis 0 or 1; the second moment
    # was one value per output neuron then as now
    W = nn.Parameter(torch.randn(6, 4))
    opt = NorMuon([W], layout=layout)
    W.grad = torch.randn(6, 4)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["layout"], group["blocks"]
        if saved_axis is not None:
            group["neuron_axis"] = saved_axis
    resumed = NorMuon([W])
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["layout"] == layout
    assert "neuron_axis" not in resumed.param_groups[0]
    torch.testing.assert_close(resumed.state[W]["second_moment"], opt.state[W]["second_moment"])
    W.grad = torch.randn(6, 4)
    resumed.step()
    opt.step()
    torch.testing.assert_close(resumed.state[W]["momentum_buffer"],
                               opt.state[W]["momentum_buffer"])


# ----------------------------------------------------------------------------- dtypes, state

def small_model(dtype):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Embedding(16, 12), nn.Linear(12, 24), nn.LayerNorm(24),
                          nn.Linear(24, 12, bias=False), nn.Linear(12, 16))
    return model.to(dtype)


def model_grads(model, steps, seed=10):
    shapes = [p.shape for p in model.parameters()]
    return random_grads(shapes, steps, seed=seed)


def make_model_optimizer(model):
    return NorMuon(param_groups(model, head=model[4]), lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_parameter_dtype_steps_with_float32_state(dtype):
    model = small_model(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_model_optimizer(model)
    for grads in model_grads(model, 3):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.to(dtype)
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, b)
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_exactly(dtype):
    steps = model_grads(small_model(dtype), 6)

    def step(model, opt, grads):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.to(dtype)
        opt.step()

    straight = small_model(dtype)
    straight_opt = make_model_optimizer(straight)
    for grads in steps:
        step(straight, straight_opt, grads)

    first = small_model(dtype)
    first_opt = make_model_optimizer(first)
    for grads in steps[:3]:
        step(first, first_opt, grads)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = small_model(dtype)
    resumed.load_state_dict(saved["model"])
    resumed_opt = make_model_optimizer(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        assert all(v.dtype == torch.float32 for v in resumed_opt.state[p].values()
                   if isinstance(v, torch.Tensor))
    for grads in steps[3:]:
        step(resumed, resumed_opt, grads)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("orthogonalizer", ["newton_schulz", "polar_express", "svd"])
@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
def test_all_zero_gradient_gives_zero_update(orthogonalizer, adjust_lr, algorithm):
    W0 = torch.randn(16, 8)
    W = nn.Parameter(W0.clone())
    opt = run_optimizer([W], [[torch.zeros(16, 8)]] * 2, lambda ps: NorMuon(
        ps, lr=0.1, weight_decay=0.5, algorithm=algorithm, orthogonalizer=orthogonalizer,
        adjust_lr=adjust_lr))
    torch.testing.assert_close(W.detach(), W0 * (1 - 0.1 * 0.5) ** 2)
    assert all(torch.isfinite(v).all() for v in opt.state[W].values())


def test_parameter_without_gradient_is_not_touched():
    frozen0, trained0, gain0 = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8)
    frozen, trained = nn.Parameter(frozen0.clone()), nn.Parameter(trained0.clone())
    frozen_gain = nn.Parameter(gain0.clone())
    opt = NorMuon([{"params": [frozen, trained]},
                   {"params": [frozen_gain], "algorithm": "adamw"}], lr=0.1, weight_decay=0.5)
    for _ in range(2):
        trained.grad = torch.randn(8, 8)
        opt.step()
    assert torch.equal(frozen.detach(), frozen0) and torch.equal(frozen_gain.detach(), gain0)
    assert frozen not in opt.state and frozen_gain not in opt.state
    assert not torch.equal(trained.detach(), trained0)


def test_nesterov_does_not_overwrite_the_gradient():
    W = nn.Parameter(torch.randn(8, 4))
    G = torch.randn(8, 4)
    W.grad = G.clone()
    opt = NorMuon([W])
    opt.step()
    opt.step()
    assert torch.equal(W.grad, G)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(momentum=1.0), "momentum must be in"),
    (dict(momentum=-0.1), "momentum must be in"),
    (dict(beta2=1.0), "beta2 must be in"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(ns_steps=0), "ns_steps must be"),
    (dict(betas=(0.9, 1.0)), "betas must be"),
    (dict(algorithm="lion"), "unknown algorithm 'lion'"),
    (dict(orthogonalizer="qr"), "unknown orthogonalizer 'qr'"),
    (dict(adjust_lr="spectral"), "unknown adjust_lr 'spectral'"),
])
def test_bad_options_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NorMuon([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_vector_in_matrix_group_names_its_shape_and_the_fix():
    with pytest.raises(ValueError, match=r"shape \(7,\).*algorithm='adamw'"):
        NorMuon([nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(7))])
    named = [("blocks.0.norm.weight", nn.Parameter(torch.randn(7)))]
    with pytest.raises(ValueError, match="blocks.0.norm.weight"):
        NorMuon([{"params": named, "algorithm": "muon"}])
    NorMuon([{"params": [nn.Parameter(torch.randn(7))], "algorithm": "adamw"}])   # fine there


def test_bad_group_added_later_is_rejected_and_not_kept():
    opt = NorMuon([nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "momentum": 2.0})
    assert len(opt.param_groups) == 1


def test_complex_parameter_is_rejected():
    with pytest.raises(ValueError, match="complex"):
        NorMuon([nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])


def test_sparse_gradient_is_rejected_with_the_fix():
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = NorMuon([{"params": embedding.parameters(), "algorithm": "adamw"}])
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient.*sparse=False"):
        opt.step()


# ----------------------------------------------------------------------------- integration

def test_lr_scheduler_drives_the_step_size():
    W = nn.Parameter(torch.randn(20, 10, dtype=torch.float64))
    opt = NorMuon([W], lr=0.04, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for step, grads in enumerate(random_grads([(20, 10)], steps=4)):
        before = W.detach().clone()
        W.grad = grads[0].double()
        opt.step()
        schedule.step()
        rms = (W.detach() - before).square().mean().sqrt().item()
        assert abs(rms - 0.2 * 0.04 * 0.5 ** step) < 1e-12


def demo_statistics_by_hand(algorithm, seed, steps, task):
    """The demo's run retraced: its task, model, batches and optimizer, but the statistics
    computed here in float64 with the statistics module, one step at a time."""
    X, y, X_val, y_val = task
    model = normuon.demo_model(seed)
    opt = NorMuon(param_groups(model, head=model[4], algorithm=algorithm),
                  lr=normuon.DEMO_LRS[algorithm], weight_decay=0.01)
    batches = torch.Generator().manual_seed(seed)
    cvs, ratios = [], []
    for _ in range(steps):
        batch = torch.randint(0, len(X), (256,), generator=batches)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
        before = model[0].weight.detach().double().clone()
        opt.step()
        delta = model[0].weight.detach().double() - before
        norms = [math.sqrt(sum(x * x for x in row)) for row in delta.tolist()]
        cvs.append(statistics.stdev(norms) / statistics.mean(norms))
        ratios.append(max(norms) / min(norms))
    with torch.no_grad():
        logits = model(X_val).double()
        val = (logits.logsumexp(dim=1) - logits.gather(1, y_val[:, None])[:, 0]).mean().item()
    return statistics.mean(cvs), statistics.mean(ratios), val


def test_demo_prints_the_statistics_of_its_own_runs_and_an_honest_verdict():
    steps, seeds = 12, [1, 2]
    result = subprocess.run([sys.executable, str(ROOT / "normuon.py"), "--steps", str(steps),
                             "--seeds", *map(str, seeds)], capture_output=True, text=True,
                            timeout=300, check=True)
    printed = {line[:33].strip(): [float(x) for x in re.findall(r"-?[\d.]+", line[33:])]
               for line in result.stdout.splitlines() if "[" in line[33:]}
    task = normuon.demo_task()
    by_hand = {name: [demo_statistics_by_hand(name, seed, steps, task) for seed in seeds]
               for name in ("muon", "normuon")}
    rows = {"first-layer update rows: CV": 0, "first-layer update rows: max/min": 1,
            "val loss": 2}
    for label, index in rows.items():
        expected = []
        for name in ("muon", "normuon"):
            values = [run[index] for run in by_hand[name]]
            expected += [statistics.mean(values), min(values), max(values)]
        assert printed[label] == pytest.approx(expected, abs=2e-4), label   # 4 decimals
    # the paper's observation, already at a dozen steps
    cv = printed["first-layer update rows: CV"]          # Muon mean, min, max, NorMuon's
    assert cv[3] < 0.6 * cv[0]

    differences = [n[2] - m[2] for m, n in zip(by_hand["muon"], by_hand["normuon"])]
    # Student's t with one degree of freedom is the Cauchy distribution: tan(0.475 pi)
    half = math.tan(0.475 * math.pi) * statistics.stdev(differences) / math.sqrt(2)
    mean = statistics.mean(differences)
    line = next(l for l in result.stdout.splitlines() if l.startswith("NorMuon - Muon"))
    numbers = [float(x) for x in re.findall(r"[-+]\d+\.\d+", line)]
    assert numbers == pytest.approx([*differences, mean, mean - half, mean + half], abs=2e-4)
    told_apart = mean + half < 0 or mean - half > 0
    assert ("NOT told apart" in result.stdout) == (not told_apart)


def test_demo_verdict_follows_the_sign_of_the_interval():
    assert "lower, told apart" in normuon.demo_verdict(-0.05, -0.01)
    assert "HIGHER here, told apart" in normuon.demo_verdict(0.01, 0.05)
    for low, high in [(-0.05, 0.01), (-0.01, 0.05), (0.0, 0.02)]:
        assert "NOT told apart" in normuon.demo_verdict(low, high)


def test_demo_plot_draws_both_optimizers_or_says_how_to_install_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "norms.png"
    flags = ["--steps", "2", "--seeds", "1", "--plot", str(png)]
    call_demo = "import sys, normuon; normuon.demo(sys.argv[1:])"
    subprocess.run([sys.executable, "-c", call_demo, *flags], timeout=300, check=True,
                   capture_output=True)
    assert png.stat().st_size > 10_000
    png.unlink()
    without_matplotlib = "import sys; sys.modules['matplotlib'] = None; " + call_demo
    result = subprocess.run([sys.executable, "-c", without_matplotlib, *flags], timeout=300,
                            check=True, capture_output=True, text=True)
    assert "pip install matplotlib" in result.stdout and not png.exists()


def test_demo_refuses_to_report_the_seed_that_chose_the_lrs():
    with pytest.raises(SystemExit):
        normuon.demo(["--seeds", "0", "1"])

