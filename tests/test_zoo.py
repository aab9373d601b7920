"""param_groups and NorMuon on the models people train, built from configs with random weights
(nothing downloaded): transformers' MoE families, whose experts are stacked 3-D parameters,
and the timm / torchvision zoo (distilled and container heads, no_weight_decay() patterns,
depthwise and grouped convs, layer-scale gains)."""
import warnings

import pytest
import torch
from torch import nn

from normuon import NorMuon, describe_param_groups, matrix_view, param_groups, to_matrices
from test_normuon import polar_by_eigh
from test_param_groups import assert_each_trainable_parameter_once, routing

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_key_value_heads=1)
# family -> (model class, config, expert layout that the family stores)
MOE = {
    "mixtral": ("MixtralForCausalLM", lambda T: T.MixtralConfig(
        **TEXT, num_local_experts=4, num_experts_per_tok=2), "experts_out_in"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", lambda T: T.Qwen3MoeConfig(
        **TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8),
        "experts_out_in"),
    "olmoe": ("OlmoeForCausalLM", lambda T: T.OlmoeConfig(
        **TEXT, num_experts=4, num_experts_per_tok=2, eos_token_id=0), "experts_out_in"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", lambda T: T.DeepseekV3Config(
        **TEXT, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=8, kv_lora_rank=8,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8), "experts_out_in"),
    "gpt_oss": ("GptOssForCausalLM", lambda T: T.GptOssConfig(
        **TEXT, num_local_experts=4, num_experts_per_tok=2, head_dim=8), "experts_in_out"),
    "llama4": ("Llama4ForCausalLM", lambda T: T.Llama4TextConfig(
        **TEXT, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=32,
        head_dim=8), "experts_in_out"),
}


def moe_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    class_name, config, _ = MOE[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, class_name)(config(transformers))


def expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The stacked expert weights, read from the module tree: >= 3-D parameters whose first
    dim is the module's expert count."""
    found = {}
    for prefix, module in model.named_modules():
        count = getattr(module, "num_experts", None)
        for name, p in module.named_parameters(recurse=False):
            if isinstance(count, int) and p.ndim == 3 and p.shape[0] == count:
                found[f"{prefix}.{name}"] = p
    return found


def routed_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        groups = param_groups(model, **kwargs)
    assert_each_trainable_parameter_once(model, groups)
    return groups


@pytest.mark.parametrize("family", MOE)
def test_moe_experts_are_matrices_routers_adamw_and_every_neuron_steps_equally(family):
    model = moe_model(family)
    groups = routed_quietly(model)
    where = routing(groups)
    experts = expert_params(model)
    assert len(experts) >= 2
    layout = MOE[family][2]
    for name in experts:
        assert where[name] == layout, name
    routers = [n for n in where if n.endswith(("mlp.gate.weight", "mlp.router.weight",
                                                "feed_forward.router.weight"))]
    assert routers and all(where[n] == "decay" for n in routers), routers
    assert "experts" in describe_param_groups(groups) and "router: " in describe_param_groups(groups)
    matrices = sum(p.numel() for g in groups if g["algorithm"] == "normuon" for _, p in g["params"])
    assert matrices > sum(p.numel() for p in experts.values())   # experts and attention

    opt = NorMuon(groups, lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    neuron_dim = -1 if layout == "experts_out_in" else -2     # the inputs of each neuron
    for name, p in experts.items():
        update = p.detach() - before[name]                       # (E, ...)
        for e in range(p.shape[0]):
            if update[e].abs().sum() == 0:     # an expert no token reached has no gradient
                continue
            norms = update[e].norm(dim=neuron_dim)               # one per output neuron
            assert norms.max() / norms.min() - 1 < 1e-3, (name, e)


@pytest.mark.parametrize("family", MOE)
def test_each_experts_update_is_the_exact_polar_factor_of_its_own_gradient(family):
    model = moe_model(family)
    groups = [g for g in routed_quietly(model, algorithm="muon")
              if g.get("layout", "").startswith("experts")]
    opt = NorMuon(groups, lr=0.01, weight_decay=0.0, momentum=0.0, orthogonalizer="svd",
                  nesterov=False)
    generator = torch.Generator().manual_seed(3)
    grads, before = {}, {}
    for name, p in expert_params(model).items():
        p.grad = torch.randn(p.shape, generator=generator)       # full rank
        grads[name], before[name] = p.grad.clone(), p.detach().clone()
    opt.step()
    for name, p in expert_params(model).items():
        for e in range(p.shape[0]):
            G = grads[name][e].double()
            if MOE[family][2] == "experts_in_out":
                G = G.T                                          # (out, in)
            m, n = G.shape
            expected = -0.01 * 0.2 * (m * n) ** 0.5 * polar_by_eigh(G) / polar_by_eigh(G).norm()
            update = (p.detach()[e] - before[name][e]).double()
            update = update.T if MOE[family][2] == "experts_in_out" else update
            torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-7)


def test_an_experts_module_that_does_not_say_its_layout_warns_and_can_be_told():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 3
            self.w_in = nn.Parameter(torch.randn(3, 8, 12))
    model = nn.Sequential(Experts(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"expert_layouts=\{'0.w_in': 'in_out'\}"):
        assert routing(param_groups(model, head=()))["0.w_in"] == "experts_out_in"
    told = routed_quietly(model, head=(), expert_layouts={"*.w_in": "in_out"})
    assert routing(told)["0.w_in"] == "experts_in_out"


def test_grouped_conv_steps_group_by_group_like_separate_convs():
    # a conv with g groups is g independent (out/g, in/g*k*k) matrices: its update equals that
    # of g separate weights stepped one by one (each its own matrix), in float64
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 12, 3, groups=3, bias=False).double()
    separate = [nn.Parameter(w.clone()) for w in conv.weight.detach().chunk(3)]   # (4, 2, 3, 3)
    opt = NorMuon(param_groups(conv, head=()), lr=0.02, orthogonalizer="svd")
    reference = NorMuon(separate, lr=0.02, orthogonalizer="svd")
    assert opt.param_groups[0]["blocks"] == 3
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        grad = torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64)
        conv.weight.grad = grad
        for p, g in zip(separate, grad.chunk(3)):
            p.grad = g.clone()
        opt.step()
        reference.step()
    torch.testing.assert_close(conv.weight.detach(), torch.cat([p.detach() for p in separate]),
                               rtol=1e-10, atol=1e-12)
    # and flattening across groups would not have given it
    flat = nn.Parameter(conv.weight.detach().clone())
    assert matrix_view(flat.shape).matrices == 1
    assert to_matrices(conv.weight.detach(), matrix_view(conv.weight.shape, blocks=3)).shape == (
        3, 4, 18)


def test_wrapped_model_is_looked_through():
    model = moe_model("mixtral")
    wrapped = nn.DataParallel(model)
    assert routing(routed_quietly(wrapped)) == routing(routed_quietly(model))
    assert routing(routed_quietly(model))["lm_head.weight"] == "decay"


# ----------------------------------------------------------------------------- the vision zoo

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# name -> (image size, expectations: parameter name -> kind)
TIMM = {
    "deit_tiny_distilled_patch16_224": (32, {"head.weight": "decay", "head_dist.weight": "decay",
                                             "dist_token": "no_decay"}),
    "levit_128s": (64, {"head.linear.weight": "decay", "head_dist.linear.weight": "decay"}),
    "convnext_atto": (64, {"stages.0.blocks.0.conv_dw.weight": "decay",    # depthwise
                           "stages.0.blocks.0.mlp.fc1.weight": "rows"}),
    "efficientnet_b0": (64, {"blocks.1.0.conv_dw.weight": "decay", "classifier.weight": "decay",
                             "blocks.1.0.conv_pw.weight": "rows"}),
    "regnetx_002": (64, {"s1.b1.conv2.conv.weight": "rows/3", "s4.b1.conv2.conv.weight": "rows/46"}),
    "xcit_nano_12_p16_224": (32, {"pos_embed.token_projection.weight": "no_decay"}),
    "twins_svt_small": (None, {"pos_block.0.proj.0.weight": "no_decay"}),
    "maxvit_rmlp_pico_rw_256": (64, {
        "stages.0.blocks.0.attn_block.attn.rel_pos.mlp.fc1.weight": "no_decay",
        "stages.0.blocks.0.attn_block.attn.rel_pos.mlp.fc2.weight": "no_decay"}),
    "vit_tiny_patch16_224": (32, {"head.weight": "decay", "pos_embed": "no_decay"}),
}
TIMM_SIZED = ("vit", "deit", "xcit", "levit", "maxvit")   # these take img_size=
TORCHVISION = {
    "vgg11": {"classifier.0.weight": "rows", "classifier.3.weight": "rows",
              "classifier.6.weight": "decay"},
    "mobilenet_v3_small": {"classifier.0.weight": "rows", "classifier.3.weight": "decay",
                           "features.1.block.0.0.weight": "decay"},               # depthwise
    "convnext_tiny": {"features.1.0.layer_scale": "no_decay", "classifier.2.weight": "decay"},
    "swin_t": {"head.weight": "decay", "features.1.0.attn.qkv.weight": "rows"},
    "resnet18": {"fc.weight": "decay", "conv1.weight": "rows"},
}
# Stepped with the exact float64 orthogonalizer: on 2 CPU cores without bf16 matmul units a
# bf16 Newton-Schulz step of swin_t or convnext_tiny took 43 s, of vgg11 (a 4096 x 25088
# hidden matrix) over half an hour; with "svd" 5-6 s, and vgg11 223-238 s. The routing is what
# these steps test; the bf16 iteration is tested on the rest of the zoo.
EXACT_STEP = ("twins_svt_small", "vgg11", "convnext_tiny", "swin_t")
HEAVY = ("vgg11",)                       # stepped only with --heavy; routed always


def zoo_model(name):
    """A zoo model with random weights: (model, expected routing, image size)."""
    torch.manual_seed(0)
    if name in TIMM:
        size, expected = TIMM[name]
        kwargs = {"img_size": size} if name.startswith(TIMM_SIZED) else {}
        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs), expected, size
    return getattr(torchvision.models, name)(num_classes=5), TORCHVISION[name], 64


def check_zoo_routing(model, expected):
    groups = routed_quietly(model)
    where = routing(groups)
    for name, kind in expected.items():
        assert where[name] == kind, (name, where[name])
    for name, p in model.named_parameters():   # gains of any shape, biases: no decay
        if sum(s > 1 for s in p.shape) <= 1 and where[name] not in ("decay",):
            assert where[name] == "no_decay", name
    return groups


def step_zoo_model(name, model, groups, image_size):
    """One real step on the model's own classification loss; nothing may turn non-finite."""
    model.train()
    orthogonalizer = "svd" if name in EXACT_STEP else "newton_schulz"
    # one iteration: the routing is under test
    opt = NorMuon(groups, lr=1e-3, ns_steps=1, orthogonalizer=orthogonalizer)
    size = image_size or model.default_cfg["input_size"][-1]
    out = model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    out = out[0] if isinstance(out, tuple) else out
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
        assert torch.isfinite(p).all(), name


@pytest.mark.parametrize("name", [*TIMM, *TORCHVISION])
def test_zoo_model_is_routed_by_the_rules_and_steps(name):
    model, expected, size = zoo_model(name)
    groups = check_zoo_routing(model, expected)
    if name not in HEAVY:
        step_zoo_model(name, model, groups, size)


@pytest.mark.heavy
@pytest.mark.parametrize("name", HEAVY)
def test_heavy_zoo_model_takes_one_finite_step(name):
    model, expected, size = zoo_model(name)
    step_zoo_model(name, model, check_zoo_routing(model, expected), size)


def test_headless_model_warning_says_what_it_found():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              img_size=32)
    with pytest.warns(UserWarning, match=r"get_classifier\(\) returned Identity \(no parameters\)"):
        param_groups(model)
