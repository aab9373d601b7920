"""Two options of the field's NorMuon: `split_sizes` (a fused projection's blocks, each its own
matrix in every step) on the real fused layers (nn.MultiheadAttention's in_proj_weight,
Hugging Face GPT-2's c_attn, timm's qkv), and `cautious_weight_decay`, against the formula
computed independently (the same step without decay gives the update)."""
import copy
import pickle

import pytest
import torch
from einops import rearrange
from torch import nn

import train_gpt
from normuon import NorMuon, param_groups
from test_normuon import polar_by_eigh


def exact_block_update(G_block: torch.Tensor, lr: float) -> torch.Tensor:
    """Muon's match_rms_adamw step for one (neurons, inputs) block with momentum 0: the polar
    factor of the gradient, scaled to RMS 0.2*lr, subtracted."""
    P = polar_by_eigh(G_block.double())
    return -0.2 * lr * P * (P.numel() ** 0.5) / P.norm()


EXACT_MUON = dict(algorithm="muon", orthogonalizer="svd", momentum=0.0, weight_decay=0.0)


# ----------------------------------------------------------------------------- split_sizes

def fused_layers():
    """(model, its head, the fused weight's name, its split, whether it is stored (in, out))."""
    torch.manual_seed(0)
    mha = nn.Sequential(nn.MultiheadAttention(12, 3, dtype=torch.float64))
    layers = [(mha, (), "0.in_proj_weight", [12] * 3, False)]
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=12, n_layer=1, n_head=3, bos_token_id=0,
        eos_token_id=0)).double()
    layers.append((gpt2, None, "transformer.h.0.attn.c_attn.weight", [12] * 3, True))  # (in, 3D)
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            embed_dim=12, depth=1, num_heads=3, num_classes=4).double()
    layers.append((vit, None, "blocks.0.attn.qkv.weight", [4] * 6 + [12], False))  # q, k per head
    return layers


@pytest.mark.parametrize("index", [0, 1, 2], ids=["mha_in_proj", "gpt2_c_attn", "timm_qkv"])
def test_each_block_of_a_real_fused_layer_steps_as_the_polar_factor_of_its_own_gradient(index):
    model, head, name, sizes, stored_in_out = fused_layers()[index]
    groups = param_groups(model, head=head, split_sizes={name: sizes})
    split = [g for g in groups if g.get("split_sizes")]
    assert [n for n, _ in split[0]["params"]] == [name] and split[0]["split_sizes"] == sizes
    W = model.get_parameter(name)
    start = W.detach().clone()
    G = torch.randn(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(1))
    W.grad = G.clone()                               # the only parameter with a gradient
    NorMuon(groups, lr=0.1, **EXACT_MUON).step()
    update = W.detach() - start
    neuron_dim = 1 if stored_in_out else 0
    as_rows = (lambda t: t.T) if stored_in_out else (lambda t: t)    # (neurons, inputs)
    for G_block, update_block in zip(G.split(sizes, neuron_dim), update.split(sizes, neuron_dim)):
        torch.testing.assert_close(as_rows(update_block), exact_block_update(as_rows(G_block), 0.1),
                                   rtol=1e-9, atol=1e-12)
    # orthogonalized whole, the blocks would be coupled: a different update
    whole = exact_block_update(as_rows(G), 0.1)
    assert (as_rows(update) - whole).abs().max() > 0.1 * whole.abs().max()


def random_grads(shape, steps, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("layout, shape, sizes, dim", [
    ("out_in", (12, 7), [3, 5, 4], 0),
    ("in_out", (7, 12), [4, 4, 4], 1),
    ("experts_out_in", (3, 10, 6), [6, 4], 1),
    ("experts_in_out", (3, 6, 10), [2, 8], 2)])
@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_a_split_parameter_steps_as_its_blocks_would_as_separate_parameters(
        layout, shape, sizes, dim, algorithm, adjust_lr):
    # the default orthogonalizer, momentum, nesterov and weight decay, over 4 steps: every step
    # of the blocks (polar factor, second moments, norms, shape factor) is the block's own
    torch.manual_seed(0)
    fused = nn.Parameter(torch.randn(shape))
    blocks = [nn.Parameter(b.detach().clone()) for b in fused.split(sizes, dim)]
    options = dict(lr=0.02, weight_decay=0.1, algorithm=algorithm, adjust_lr=adjust_lr,
                   layout=layout)
    fused_opt = NorMuon([fused], split_sizes=sizes, **options)
    blocks_opt = NorMuon(blocks, **options)
    for G in random_grads(shape, 4):
        fused.grad = G
        for block, G_block in zip(blocks, G.split(sizes, dim)):
            block.grad = G_block.contiguous()
        fused_opt.step()
        blocks_opt.step()
    torch.testing.assert_close(fused.detach(), torch.cat([b.detach() for b in blocks], dim),
                               rtol=1e-5, atol=1e-6)
    # the state keeps the parameter's layout: one second moment per neuron, in order
    v = fused_opt.state[fused]["second_moment"]
    torch.testing.assert_close(v, torch.cat([blocks_opt.state[b]["second_moment"]
                                             for b in blocks], dim=v.ndim - 1))


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_after_one_normuon_step_each_blocks_rows_are_normalized_within_the_block(adjust_lr):
    # rows of very different scale in each block; the blocks differ in size
    sizes, n, lr = [2, 6, 16], 8, 0.05
    row_scales = torch.logspace(-1, 1, sum(sizes), dtype=torch.float64)[:, None]
    G = torch.randn(sum(sizes), n, dtype=torch.float64) * row_scales
    W = nn.Parameter(torch.zeros_like(G))
    W.grad = G
    NorMuon([W], lr=lr, split_sizes=sizes, orthogonalizer="svd", weight_decay=0.0,
            adjust_lr=adjust_lr, eps=1e-20).step()   # (eps would show at 1e-6 here)
    for size, block in zip(sizes, W.detach().split(sizes)):
        row_norms = block.norm(dim=1)
        assert (row_norms.max() / row_norms.min() - 1).abs() < 1e-6, row_norms
        # the block's own step 6: RMS 0.2*lr, or Muon's scale with the block's own shape
        # (|O|_F of a block's exact polar factor is sqrt(min(size, n)))
        expected = (0.2 * lr * (size * n) ** 0.5 if adjust_lr == "match_rms_adamw"
                    else lr * max(1, size / n) ** 0.5 * min(size, n) ** 0.5)
        assert abs(block.norm().item() / expected - 1) < 1e-6


def test_a_state_dict_from_before_the_options_existed_loads_and_keeps_the_split():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(9, 4))
    make = lambda: NorMuon([{"params": [W], "split_sizes": [3, 6]}], lr=0.02)   # noqa: E731
    opt = make()
    grads = random_grads((9, 4), 4)
    W.grad = grads[0]
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["split_sizes"], group["cautious_weight_decay"]
    before = W.detach().clone()
    uninterrupted = copy.deepcopy(opt)            # the run as it would have gone on
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["split_sizes"] == [3, 6]
    assert resumed.param_groups[0]["cautious_weight_decay"] is False
    assert "split_sizes" not in saved["param_groups"][0]        # the caller's dict untouched
    for G in grads[1:]:
        W.grad = G
        resumed.step()
    after_resumed = W.detach().clone()
    with torch.no_grad():
        W.copy_(before)
    W_copy = uninterrupted.param_groups[0]["params"][0]
    for G in grads[1:]:
        W_copy.grad = G
        uninterrupted.step()
    torch.testing.assert_close(after_resumed, W_copy.detach(), rtol=0, atol=0)
    # a pickle from before: the defaults
    state = opt.__getstate__()
    for group in state["param_groups"]:
        del group["split_sizes"], group["cautious_weight_decay"]
    state["defaults"] = {k: v for k, v in state["defaults"].items()
                         if k not in ("split_sizes", "cautious_weight_decay")}
    unpickled = pickle.loads(pickle.dumps(opt))
    unpickled.__setstate__(state)
    assert unpickled.param_groups[0]["split_sizes"] is None
    assert unpickled.defaults["cautious_weight_decay"] is False


def test_bad_split_sizes_are_refused_naming_the_parameter():
    model = nn.Sequential(nn.MultiheadAttention(12, 3), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"parameter '0.in_proj_weight' has 36 neurons .*"
                                         r"split_sizes \[12, 12\] sum to 24; give blocks that "
                                         r"sum to 36"):
        NorMuon(param_groups(model, head="1", split_sizes={"0.in_proj_weight": [12, 12]}))
    with pytest.raises(ValueError, match=r"patterns \['0.qkv'\] match no hidden matrix"):
        param_groups(model, head="1", split_sizes={"0.qkv": [12] * 3})
    W = nn.Parameter(torch.randn(6, 4))
    for bad in ([3, 0, 3], [3.0, 3.0], "33", []):
        with pytest.raises(ValueError, match="split_sizes must be a list of neuron counts"):
            NorMuon([{"params": [W], "split_sizes": bad}])
    with pytest.raises(ValueError, match="split_sizes and blocks=2 both split"):
        NorMuon([{"params": [W], "split_sizes": [3, 3], "blocks": 2}])
    with pytest.raises(ValueError, match="cautious_weight_decay must be True or False"):
        NorMuon([W], cautious_weight_decay="yes")


def test_train_gpt_splits_its_qkv_as_its_attention_reads_it():
    cfg = train_gpt.PRESETS["tiny"]
    dim, heads = cfg.dim, cfg.n_head
    # which rows of Attention.qkv's output are which head of q, k and v, by its own rearrange
    rows = rearrange(torch.arange(3 * dim), "(three h d) -> three h d", three=3, h=heads)
    expected = [*rows[0], *rows[1], rows[2].flatten()]          # q's heads, k's heads, v
    sizes = train_gpt.qkv_split_sizes(dim, heads, "heads")
    assert [b.tolist() for b in torch.arange(3 * dim).split(sizes)] == \
        [e.tolist() for e in expected]
    assert train_gpt.qkv_split_sizes(dim, heads, "qkv") == [dim] * 3
    model = train_gpt.GPT(cfg)
    optimizer = train_gpt.build_optimizer(model, cfg, "normuon", cautious_wd=True,
                                          split_qkv="heads")
    split = [g for g in optimizer.param_groups if g["split_sizes"] is not None]
    assert len(split) == 1 and split[0]["split_sizes"] == sizes
    assert split[0]["param_names"] == [f"blocks.{i}.attn.qkv.weight" for i in range(cfg.n_layer)]
    assert all(g["cautious_weight_decay"] for g in optimizer.param_groups)


# ----------------------------------------------------------------------------- cautious decay

def masked_decay(W, update, lr, weight_decay):
    """W - lr*wd*(W * m) + update, m = [(-update) * W >= 0]: the update (lr_hat*O^ subtracted)
    moves W toward zero there too."""
    mask = ((-update) * W >= 0).to(W.dtype)
    return W - lr * weight_decay * W * mask + update


def update_without_decay(W: nn.Parameter, opt: NorMuon, G: torch.Tensor) -> torch.Tensor:
    """The update a copy of (W, opt) takes with weight_decay 0: decay never changes it."""
    W, opt = copy.deepcopy((W, opt))
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    before = W.detach().clone()
    W.grad = G
    opt.step()
    return W.detach() - before


@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_cautious_decay_is_the_masked_formula_and_plain_decay_unchanged(algorithm, adjust_lr):
    lr, weight_decay = 0.05, 0.5
    torch.manual_seed(0)
    start = torch.randn(10, 6, dtype=torch.float64)
    W = {kind: nn.Parameter(start.clone()) for kind in ("cautious", "plain")}
    opts = {kind: NorMuon([W[kind]], lr=lr, weight_decay=weight_decay, algorithm=algorithm,
                          adjust_lr=adjust_lr, orthogonalizer="svd",
                          cautious_weight_decay=kind == "cautious") for kind in W}
    masked_fractions = []
    for G in random_grads((10, 6), 4):
        G = G.double()
        update = {kind: update_without_decay(W[kind], opts[kind], G) for kind in W}
        expected = {"cautious": masked_decay(W["cautious"].detach(), update["cautious"], lr,
                                             weight_decay),
                    "plain": W["plain"].detach() * (1 - lr * weight_decay) + update["plain"]}
        masked_fractions.append(
            ((-update["cautious"]) * W["cautious"].detach() >= 0).double().mean().item())
        for kind in W:
            W[kind].grad = G
            opts[kind].step()
            torch.testing.assert_close(W[kind].detach(), expected[kind], rtol=1e-12, atol=1e-14)
    assert all(0.2 < f < 0.8 for f in masked_fractions), masked_fractions   # the mask bites
    assert (W["cautious"] - W["plain"]).abs().max() > 1e-3


def test_cautious_decay_in_an_adamw_group_masks_torch_adamws_own_update():
    lr, weight_decay, betas = 0.01, 0.3, (0.9, 0.95)
    torch.manual_seed(0)
    ours = nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
    peer = nn.Parameter(ours.detach().clone())        # torch.optim.AdamW without decay
    opt = NorMuon([ours], algorithm="adamw", lr=lr, weight_decay=weight_decay, betas=betas,
                  cautious_weight_decay=True)
    peer_opt = torch.optim.AdamW([peer], lr=lr, weight_decay=0.0, betas=betas, eps=1e-8)
    expected = ours.detach().clone()
    for G in random_grads((5, 7), 5):
        before = peer.detach().clone()
        peer.grad = G.double()
        peer_opt.step()
        update = peer.detach() - before      # Adam's update does not depend on W
        expected = masked_decay(expected, update, lr, weight_decay)
        ours.grad = G.double()
        opt.step()
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours, peer * (1 - lr * weight_decay) ** 5, atol=1e-6)
