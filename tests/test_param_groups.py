"""normuon.param_groups on hand-written modules that reproduce the naming patterns of the
popular libraries' models (the real models are in test_transformers_models.py): every parameter
lands where the routing rules in param_groups' docstring say, exactly once."""
import warnings

import pytest
import torch
from torch import nn

from normuon import NorMuon, describe_param_groups, param_groups


# ----------------------------------------------------------------------------- helpers

def routing(groups: list[dict]) -> dict[str, str]:
    """name -> "rows" / "columns" (a hidden matrix stored (out, in) / (in, out)), "experts_out_in"
    / "experts_in_out", with "/g" for g blocks (a grouped conv's), or "decay" / "no_decay"."""
    where = {}
    for group in groups:
        if group["algorithm"] == "adamw":
            kind = "no_decay" if group.get("weight_decay") == 0.0 else "decay"
        else:
            kind = {"out_in": "rows", "in_out": "columns"}.get(group["layout"], group["layout"])
            kind += f"/{group['blocks']}" if group["blocks"] != 1 else ""
        for name, _ in group["params"]:
            assert name not in where, f"{name} is in two groups"
            where[name] = kind
    return where


def assert_each_trainable_parameter_once(model: nn.Module, groups: list[dict]) -> None:
    ids = [id(p) for group in groups for _, p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def routed(model: nn.Module, **kwargs) -> dict[str, str]:
    """Route `model`, asserting that no warning is raised and every parameter is placed once."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = param_groups(model, **kwargs)
    assert_each_trainable_parameter_once(model, groups)
    where = routing(groups)
    NorMuon(groups)   # and the optimizer accepts them
    return where


def sublayer(**children) -> nn.ModuleDict:
    return nn.ModuleDict(children)


# ----------------------------------------------------------------------------- the models

class BertStyle(nn.Module):
    """BERT/RoBERTa/ELECTRA naming: `attention.output.dense` and `output.dense` are hidden."""

    def __init__(self, d=8, layers=2):
        super().__init__()
        self.embeddings = sublayer(word=nn.Embedding(20, d), LayerNorm=nn.LayerNorm(d))
        self.layer = nn.ModuleList(sublayer(
            attention=sublayer(query=nn.Linear(d, d), key=nn.Linear(d, d),
                               output=sublayer(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d))),
            intermediate=sublayer(dense=nn.Linear(d, 4 * d)),
            output=sublayer(dense=nn.Linear(4 * d, d), LayerNorm=nn.LayerNorm(d)),
        ) for _ in range(layers))
        self.classifier = nn.Linear(d, 3)


class ViTStyle(nn.Module):
    """ViT/DeiT naming: free tokens and position embeddings, a conv patch embedding, an MLP
    whose first layer is called `fc` inside each block, and a `head`."""

    def __init__(self, d=8, patches=4, list_no_decay=False):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, d))
        self.patch_embed = sublayer(proj=nn.Conv2d(3, d, 4, stride=4))
        self.blocks = nn.ModuleList(sublayer(
            norm=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
            mlp=sublayer(fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d))) for _ in range(2))
        self.head = nn.Linear(d, 5)
        self.list_no_decay = list_no_decay

    def no_weight_decay(self):
        return {"cls_token", "pos_embed"} if self.list_no_decay else set()


class ResNetStyle(nn.Module):
    """torchvision ResNet naming: convolutions with batch norms and an `fc` head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)


class ScoreStyle(nn.Module):
    """*ForSequenceClassification on a causal-LM backbone: the head is `score`."""

    def __init__(self, d=8):
        super().__init__()
        self.model = sublayer(embed_tokens=nn.Embedding(20, d),
                              layers=nn.ModuleList(sublayer(q_proj=nn.Linear(d, d, bias=False),
                                                            norm=nn.RMSNorm(d))
                                                   for _ in range(2)))
        self.score = nn.Linear(d, 2, bias=False)


class MambaStyle(nn.Module):
    """A Mamba mixer: state-space parameters A_log (d_inner, N) and D, a depthwise conv, and an
    `lm_head` tied to the embedding."""

    def __init__(self, d=8, state=4, flag_no_decay=False):
        super().__init__()
        self.embeddings = nn.Embedding(20, d)
        mixer = sublayer(in_proj=nn.Linear(d, 4 * d, bias=False),
                         conv1d=nn.Conv1d(2 * d, 2 * d, 4, groups=2 * d),
                         out_proj=nn.Linear(2 * d, d, bias=False))
        mixer.A_log = nn.Parameter(torch.zeros(2 * d, state))
        mixer.D = nn.Parameter(torch.ones(2 * d))
        if flag_no_decay:
            mixer.A_log._no_weight_decay = True
        self.mixer = mixer
        self.lm_head = nn.Linear(d, 20, bias=False)
        self.lm_head.weight = self.embeddings.weight


class Conv1D(nn.Module):
    """A linear layer stored (in, out), as the GPT-2 family's in Hugging Face transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).view(
            *x.shape[:-1], self.nf)


class GPT2Style(nn.Module):
    def __init__(self, d=16, vocab=40):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(sublayer(ln_1=nn.LayerNorm(d), c_fc=Conv1D(4 * d, d),
                                        c_proj=Conv1D(d, 4 * d)) for _ in range(2))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = x + block.c_proj(torch.relu(block.c_fc(block.ln_1(x))))
        return self.lm_head(x)


class TiedDecoder(nn.Module):
    """An unconventionally named output layer tied to the input embedding."""

    def __init__(self, d=8):
        super().__init__()
        self.encoder = nn.Embedding(20, d)
        self.hidden = nn.Linear(d, d)
        self.decoder = nn.Linear(d, 20, bias=False)
        self.decoder.weight = self.encoder.weight


# ----------------------------------------------------------------------------- routing

def test_bert_style_output_dense_layers_are_hidden_and_classifier_is_the_head():
    where = routed(BertStyle())
    for i in range(2):
        for name in ("attention.query", "attention.key", "attention.output.dense",
                     "intermediate.dense", "output.dense"):
            assert where[f"layer.{i}.{name}.weight"] == "rows"
            assert where[f"layer.{i}.{name}.bias"] == "no_decay"
        assert where[f"layer.{i}.output.LayerNorm.weight"] == "no_decay"
    assert where["classifier.weight"] == "decay" and where["classifier.bias"] == "no_decay"
    assert where["embeddings.word.weight"] == "decay"


@pytest.mark.parametrize("list_no_decay", [False, True])
def test_vit_style_tokens_go_to_adamw_and_its_no_weight_decay_list_is_honoured(list_no_decay):
    where = routed(ViTStyle(list_no_decay=list_no_decay))
    # cls_token (1, 1, d) has one dim larger than 1, like a gain: no decay either way
    assert where["cls_token"] == "no_decay"
    assert where["pos_embed"] == ("no_decay" if list_no_decay else "decay")
    assert where["patch_embed.proj.weight"] == "rows"
    assert where["blocks.0.mlp.fc.weight"] == "rows"       # `fc` inside a block is hidden
    assert where["blocks.1.qkv.weight"] == where["blocks.1.proj.weight"] == "rows"
    assert where["head.weight"] == "decay"


def test_resnet_style_fc_is_the_head():
    where = routed(ResNetStyle())
    assert where["conv1.weight"] == where["layer1.0.weight"] == "rows"
    assert where["bn1.weight"] == where["bn1.bias"] == where["layer1.1.weight"] == "no_decay"
    assert where["fc.weight"] == "decay"


def test_score_head_of_a_causal_lm_classifier_goes_to_adamw():
    where = routed(ScoreStyle())
    assert where["score.weight"] == "decay"
    assert where["model.layers.0.q_proj.weight"] == "rows"
    assert where["model.embed_tokens.weight"] == "decay"
    assert where["model.layers.1.norm.weight"] == "no_decay"


@pytest.mark.parametrize("flag_no_decay", [False, True])
def test_mamba_style_state_space_parameters_go_to_adamw(flag_no_decay):
    where = routed(MambaStyle(flag_no_decay=flag_no_decay))
    assert where["mixer.A_log"] == ("no_decay" if flag_no_decay else "decay")
    assert where["mixer.D"] == "no_decay"
    assert where["mixer.in_proj.weight"] == where["mixer.out_proj.weight"] == "rows"
    assert where["mixer.conv1d.weight"] == "decay"    # depthwise: one-neuron matrices
    assert where["embeddings.weight"] == "decay"     # tied to lm_head: listed once


def test_weights_stored_in_out_get_neuron_axis_1():
    where = routed(GPT2Style())
    assert where["h.0.c_fc.weight"] == where["h.1.c_proj.weight"] == "columns"
    assert where["h.0.c_fc.bias"] == "no_decay"
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.Linear(6, 6), nn.Linear(6, 2))
    where = routed(model, head=model[2])
    assert where["0.weight"] == "columns" and where["1.weight"] == "rows"


def test_attention_and_recurrent_projections_are_hidden():
    model = sublayer(attn=nn.MultiheadAttention(8, 2, add_bias_kv=True),
                     lstm=nn.LSTM(8, 8, num_layers=2, proj_size=4), head=nn.Linear(8, 2))
    where = routed(model)
    assert where["attn.in_proj_weight"] == where["attn.out_proj.weight"] == "rows"
    assert where["attn.bias_k"] == "no_decay"   # a (1, 1, 8) bias
    for name in ("weight_ih_l0", "weight_hh_l0", "weight_hr_l0", "weight_ih_l1"):
        assert where[f"lstm.{name}"] == "rows"
    assert where["lstm.bias_ih_l0"] == where["attn.in_proj_bias"] == "no_decay"


def test_tied_embedding_stays_adamw_and_an_unfound_head_warns():
    model = TiedDecoder()
    with pytest.warns(UserWarning, match=r"no output head in TiedDecoder.*head=\(\)"):
        groups = param_groups(model)
    where = routing(groups)
    assert where == {"encoder.weight": "decay", "hidden.weight": "rows",
                     "hidden.bias": "no_decay"}
    assert routed(model, head="decoder") == where      # named: no warning, same routing
    assert routed(nn.Sequential(nn.Linear(4, 4)), head=()) == {"0.weight": "rows",
                                                              "0.bias": "no_decay"}


def test_explicit_head_list_and_frozen_parameters():
    model = ScoreStyle()
    model.model.layers[0].q_proj.weight.requires_grad_(False)
    where = routed(model, head=["model.layers.1.q_proj", model.score.weight])
    assert where["model.layers.1.q_proj.weight"] == "decay"
    assert where["score.weight"] == "decay"
    assert "model.layers.0.q_proj.weight" not in where
    with pytest.raises(AttributeError, match="no_such_layer"):
        param_groups(model, head="no_such_layer")


def test_adamw_options_go_to_adamw_groups_and_no_decay_stays_zero():
    groups = param_groups(BertStyle(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.99))
    hidden, decay, no_decay = groups
    assert "lr" not in hidden and "weight_decay" not in hidden
    assert decay["lr"] == no_decay["lr"] == 3e-3 and decay["betas"] == (0.9, 0.99)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_gains_and_biases_do_not_decay_without_gradient_signal():
    # With zero gradients AdamW's and NorMuon's updates vanish and only decay is left: the
    # decayed weights shrink by (1 - lr*wd) per step, the gains and biases keep their value.
    torch.manual_seed(0)
    model = BertStyle()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    where = routed(model)
    opt = NorMuon(param_groups(model), lr=1e-2, weight_decay=0.1)
    for _ in range(100):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    shrink = (1 - 1e-2 * 0.1) ** 100
    for name, p in model.named_parameters():
        expected = before[name] * (1.0 if where[name] == "no_decay" else shrink)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- the neuron axis

def test_conv1d_layer_steps_every_output_neuron_equally_like_nn_linear():
    # NorMuon's first step gives every output neuron an update of the same norm; for a Conv1D
    # weight (in, out) the output neurons are its columns.
    torch.manual_seed(1)
    model = GPT2Style()
    idx = torch.randint(0, 40, (4, 12))
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    before = model.h[0].c_fc.weight.detach().clone()
    NorMuon(param_groups(model), lr=1e-2, weight_decay=0.0).step()
    update = model.h[0].c_fc.weight.detach() - before            # (in, out) = (16, 64)
    neuron_norms = update.norm(dim=0)
    assert (neuron_norms.max() / neuron_norms.min() - 1) < 1e-3
    input_norms = update.norm(dim=1)                            # not normalized: they differ
    assert input_norms.max() / input_norms.min() > 1.01


# ----------------------------------------------------------------------------- the summary

def test_summary_has_a_line_per_group_with_counts_and_folded_names():
    model = BertStyle(layers=3)
    groups = param_groups(model)
    lines = describe_param_groups(groups).splitlines()
    assert len(lines) == len(groups)
    for line, group in zip(lines, groups):
        assert f"{len(group['params'])} tensors" in line
        assert f"{sum(p.numel() for _, p in group['params']):,} elements" in line
    assert lines[0].count("layer.*.attention.output.dense.weight") == 1
    assert "layer.0." not in lines[0]
    assert "weight_decay=0.0" in lines[2] and "classifier.weight" in lines[1]
    # an optimizer's groups read the same, apart from the defaults it filled in
    opt_lines = describe_param_groups(NorMuon(groups).param_groups).splitlines()
    assert [line.split(": ", 1)[1] for line in opt_lines] == [
        line.split(": ", 1)[1] for line in lines]
