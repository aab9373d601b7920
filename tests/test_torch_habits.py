"""What users of torch.optim expect of NorMuon beyond the math: a tensor lr (also compiled),
state dicts that round-trip, errors before any work, closures, groups added later, zero-size
matrices, non-finite gradients, and gradients at any scale of float32. (torch's own generic
optimizer tests check these properties for every torch.optim optimizer.)"""
import copy
import math
import pickle

import pytest
import torch
from torch import nn

from normuon import NorMuon, param_groups

ORTHOGONALIZERS = ["newton_schulz", "polar_express", "svd"]


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.LayerNorm(16),
                         nn.Linear(16, 8), nn.Linear(8, 10))


def set_grads(model, step):
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


# ----------------------------------------------------------------------------- tensor lr

def test_one_element_tensor_lr_steps_exactly_as_the_float_with_a_scheduler():
    runs = []
    for lr in (4e-3, torch.tensor(4e-3, dtype=torch.float64), torch.tensor([4e-3],
                                                                          dtype=torch.float64)):
        model = small_model()
        opt = NorMuon(param_groups(model, head=model[4]), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
        for step in range(6):
            set_grads(model, step)
            opt.step()
            schedule.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for tensor_run in runs[1:]:
        for a, b in zip(runs[0], tensor_run):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_multi_element_tensor_lr_is_refused_at_construction_and_in_add_param_group():
    W = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        NorMuon([W], lr=torch.tensor([1e-3, 2e-3]))
    opt = NorMuon([W])
    with pytest.raises(ValueError, match="param group 1: Tensor lr must be 1-element"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))],
                             "lr": torch.ones(2, 2)})
    assert len(opt.param_groups) == 1


def compiled_run(lr, steps=8):
    """Step a compiled opt.step under a cosine schedule; return (parameters, frames compiled)."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = small_model()
    opt = NorMuon(param_groups(model, head=model[4]), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    for i in range(steps):
        set_grads(model, i)
        step()
        schedule.step()
    return [p.detach().clone() for p in model.parameters()], counter.frame_count


def test_compiled_step_with_tensor_lr_recompiles_no_more_than_with_float_lr():
    float_params, float_frames = compiled_run(4e-3)
    tensor_params, tensor_frames = compiled_run(torch.tensor(4e-3))
    assert tensor_frames <= float_frames
    assert tensor_frames <= 3       # the first step (empty state), then steady
    for a, b in zip(float_params, tensor_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- state round trips

def stepped_optimizer(named: bool, steps: int = 2):
    """A model and its NorMuon (a matrix and an AdamW group, with or without param names)
    after `steps` steps."""
    model = small_model()
    groups = param_groups(model, head=model[4])
    if not named:
        groups = [{**group, "params": [p for _, p in group["params"]]} for group in groups]
    opt = NorMuon(groups, lr=4e-3)
    for step in range(steps):
        set_grads(model, step)
        opt.step()
    return model, opt


def assert_same(a, b, where="state_dict"):
    """Equal keys, types and values all the way down; tensors bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_state_dict_is_identical_after_load_deepcopy_and_pickle(named):
    model, opt = stepped_optimizer(named)
    saved = copy.deepcopy(opt.state_dict())
    assert ("param_names" in saved["param_groups"][0]) == named
    round_trips = {
        "deepcopy": lambda: copy.deepcopy(opt),
        "pickle": lambda: pickle.loads(pickle.dumps(opt)),
        "load_state_dict": lambda: (opt.load_state_dict(copy.deepcopy(saved)), opt)[1],
        "load into a new optimizer": lambda: (
            (fresh := stepped_optimizer(named, steps=0)[1]).load_state_dict(
                copy.deepcopy(saved)), fresh)[1],
    }
    for how, round_trip in round_trips.items():
        again = round_trip()
        assert_same(saved, again.state_dict(), how)
        assert_same(saved, copy.deepcopy(again).state_dict(), f"{how}, then deepcopy")


@pytest.mark.parametrize("params", ["none", "list", "named"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(momentum=1.0), "momentum must be in"),
    (dict(betas=(0.9, 1.0)), "betas must be"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(orthogonalizer="qr"), "unknown orthogonalizer 'qr'"),
    (dict(layout="in_out_k"), "unknown layout 'in_out_k'"),
])
def test_bad_hyperparameter_is_named_at_construction_whatever_the_params(params, kwargs, message):
    W = nn.Parameter(torch.randn(4, 4))
    given = {"none": None, "list": [W], "named": [("block.fc.weight", W)]}[params]
    with pytest.raises(ValueError, match=f"^NorMuon: {message}"):
        NorMuon(given, **kwargs)


def test_step_with_a_closure_returns_its_loss_and_steps_on_its_gradients():
    x = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(5))
    calls = []

    def run(with_closure):
        model = small_model()
        opt = NorMuon(param_groups(model, head=model[4]), lr=4e-3)

        def closure():
            calls.append(with_closure)
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        losses = [opt.step(closure) if with_closure else (closure(), opt.step())[0]
                  for _ in range(3)]
        return model, torch.stack(losses)

    model, losses = run(with_closure=True)
    reference, reference_losses = run(with_closure=False)
    assert calls.count(True) == 3                 # once per step
    torch.testing.assert_close(losses, reference_losses, rtol=0, atol=0)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_group_added_after_construction_steps_as_if_given_at_construction():
    def run(added_later):
        model = small_model()
        matrices, *adamw = param_groups(model, head=model[4])
        opt = NorMuon([matrices] + ([] if added_later else adamw), lr=4e-3)
        for group in adamw if added_later else []:
            opt.add_param_group(group)
        for step in range(3):
            set_grads(model, step)
            opt.step()
        return model, opt

    model, opt = run(added_later=True)
    reference, reference_opt = run(added_later=False)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert_same(reference_opt.state_dict(), opt.state_dict())


# ----------------------------------------------------------------------------- zero-size matrices

@pytest.mark.parametrize("orthogonalizer", ORTHOGONALIZERS)
def test_zero_size_matrices_step_as_nothing_and_leave_the_others_unchanged(orthogonalizer):
    def run(with_empty):
        torch.manual_seed(1)
        params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))]
        empty = [nn.Parameter(torch.randn(0, 4)), nn.Parameter(torch.randn(6, 0))]
        opt = NorMuon(params + (empty if with_empty else []), orthogonalizer=orthogonalizer)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params + empty:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, empty, opt

    params, empty, opt = run(with_empty=True)
    reference, _, _ = run(with_empty=False)
    for a, b in zip(params, reference):
        assert torch.equal(a, b)
    assert opt.state[empty[1]]["second_moment"].shape == (6,)
    assert torch.equal(opt.state[empty[1]]["second_moment"], torch.zeros(6))


# ----------------------------------------------------------------------------- non-finite gradients

@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
@pytest.mark.parametrize("orthogonalizer", ORTHOGONALIZERS)
def test_non_finite_gradient_propagates_into_its_own_parameter_only(orthogonalizer, algorithm):
    # As in torch.optim: a NaN or inf gradient makes that parameter non-finite and touches no
    # other. Same-shape matrices are orthogonalized as one batch: the good one must not notice.
    def run(bad):
        torch.manual_seed(2)
        good, nan, inf = (nn.Parameter(torch.randn(8, 5)) for _ in range(3))
        gain = nn.Parameter(torch.ones(5))
        opt = NorMuon([{"params": [good, nan, inf] if bad else [good]},
                       {"params": [gain], "algorithm": "adamw"}],
                      orthogonalizer=orthogonalizer, algorithm=algorithm)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            good.grad, gain.grad = torch.randn(8, 5, generator=gen), torch.randn(5, generator=gen)
            nan.grad, inf.grad = torch.randn(8, 5), torch.randn(8, 5)
            if step == 1:
                nan.grad[2, 3] = math.nan
                inf.grad[0, 0] = math.inf
            opt.step()                                   # never raises
        return good, nan, inf, gain

    good, nan, inf, gain = run(bad=True)
    reference_good, _, _, reference_gain = run(bad=False)
    assert torch.equal(good, reference_good) and torch.equal(gain, reference_gain)
    assert not torch.isfinite(nan).any() and not torch.isfinite(inf).any()


# ----------------------------------------------------------------------------- gradient scale

@pytest.mark.parametrize("orthogonalizer", ORTHOGONALIZERS)
def test_matrix_update_does_not_depend_on_the_gradient_scale(orthogonalizer):
    # Powers of two scale every float exactly, so the updates must agree bit for bit, from
    # gradients near float32's smallest normal numbers to ones whose squared norm overflows it.
    def update(scale):
        torch.manual_seed(3)
        W = nn.Parameter(torch.randn(16, 12))
        before = W.detach().clone()
        opt = NorMuon([W], orthogonalizer=orthogonalizer, weight_decay=0.0)
        for step in range(3):
            W.grad = torch.randn(16, 12, generator=torch.Generator().manual_seed(step)) * scale
            opt.step()
        return W.detach() - before

    reference = update(1.0)
    assert reference.abs().max() > 0
    for exponent in (-100, -60, 40, 80, 120):
        torch.testing.assert_close(update(2.0 ** exponent), reference, rtol=0, atol=0,
                                   msg=f"gradient scale 2^{exponent}")
    # Other scales round the bf16 iteration's input differently; at the ends of float32's
    # range the update moves no more than it does for a gradient times 3.
    def change(scale):
        return float((update(scale) - reference).norm() / reference.norm())

    rounding = change(3.0)
    for scale in (1e-30, 1e30):
        assert change(scale) <= 2 * rounding + 1e-6, f"gradient scale {scale}"


# ----------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("orthogonalizer", ["svd", "newton_schulz"])
def test_accumulated_micro_batches_step_as_the_whole_batch(orthogonalizer):
    # The gradients differ only in float32 summation order. The exact polar factor keeps that
    # difference at float32 size; Newton-Schulz rounds to bf16, so there the runs agree to
    # bf16 precision.
    x = torch.randint(0, 10, (8, 6), generator=torch.Generator().manual_seed(4))

    def run(micro_batches):
        model = small_model()
        opt = NorMuon(param_groups(model, head=model[4]), orthogonalizer=orthogonalizer,
                      lr=4e-3)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        for _ in range(3):
            for part in x.chunk(micro_batches):
                (model(part).square().mean() / micro_batches).backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()]) - start

    whole, accumulated = run(1), run(4)     # the changes of the parameters
    difference = float((whole - accumulated).norm() / whole.norm())
    assert difference < (1e-5 if orthogonalizer == "svd" else 1e-2)
