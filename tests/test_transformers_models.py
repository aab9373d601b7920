"""normuon.param_groups on real models: tiny configs of Hugging Face transformers models (built
from configs, nothing downloaded), routed as the rules in param_groups' docstring say, and
stepped on their own loss."""
import warnings

import pytest
import torch
from torch import nn

from normuon import NorMuon, param_groups
from test_param_groups import assert_each_trainable_parameter_once, routing

transformers = pytest.importorskip("transformers")


def tiny_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    T = transformers
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32)
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(
            **text, max_position_embeddings=32, num_labels=3))
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(
            image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, num_labels=3))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_positions=32, n_embd=16,
                                              n_layer=2, n_head=2, bos_token_id=0,
                                              eos_token_id=0))
    if name == "llama":
        return T.LlamaForSequenceClassification(T.LlamaConfig(
            **text, num_key_value_heads=1, num_labels=3, pad_token_id=0))
    if name == "resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    if name == "mamba":
        return T.MambaForCausalLM(T.MambaConfig(vocab_size=64, hidden_size=16, state_size=4,
                                                num_hidden_layers=2, expand=2, conv_kernel=4))
    raise ValueError(name)


def loss_of(name: str, model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if name in ("vit", "resnet"):
        pixels = torch.randn(4, 3, 16, 16, generator=gen)
        return model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 0])).loss
    ids = torch.randint(1, 64, (4, 12), generator=gen)
    if name in ("bert", "llama"):
        return model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss
    return model(input_ids=ids, labels=ids).loss


def linear_weights(model: nn.Module, prefix: str, kinds=(nn.Linear,)) -> set[str]:
    """Names of the weights of `kinds` of layers under `prefix`, read from the module tree."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, kinds)}


def expect(where: dict[str, str], kind: str, names) -> None:
    names = set(names)
    assert names, "the expectation names no parameter"
    wrong = {name: where.get(name) for name in names if where.get(name) != kind}
    assert not wrong, f"expected {kind}: {wrong}"


def check_bert(model, where):
    expect(where, "rows", linear_weights(model, "bert.encoder") | {"bert.pooler.dense.weight"})
    assert len(linear_weights(model, "bert.encoder")) == 12   # 6 per layer, output.dense too
    expect(where, "decay", {"classifier.weight", "bert.embeddings.word_embeddings.weight"})


def check_vit(model, where):
    expect(where, "rows", linear_weights(model, "vit.", (nn.Linear, nn.Conv2d)))
    expect(where, "decay", {"vit.embeddings.position_embeddings", "classifier.weight"})
    expect(where, "no_decay", {"vit.embeddings.cls_token"})   # (1, 1, D): gain-shaped


def check_gpt2(model, where):
    conv1d = {f"{name}.weight" for name, module in model.named_modules()
              if type(module).__name__ == "Conv1D"}
    assert len(conv1d) == 8
    expect(where, "columns", conv1d)
    expect(where, "decay", {"transformer.wte.weight", "transformer.wpe.weight"})
    assert "lm_head.weight" not in where   # tied to wte: one parameter, listed once


def check_llama(model, where):
    expect(where, "rows", linear_weights(model, "model.layers"))
    expect(where, "decay", {"score.weight", "model.embed_tokens.weight"})


def check_resnet(model, where):
    expect(where, "rows", linear_weights(model, "resnet.", (nn.Conv2d,)))
    expect(where, "decay", linear_weights(model, "classifier"))


def check_mamba(model, where):
    # dt_proj is (d_inner, dt_rank) = (32, 1): one input per neuron, so not a matrix
    # (matrices of fewer than 2 neurons or inputs go to AdamW), like the depthwise conv1d
    linears = linear_weights(model, "backbone.layers")
    single_input = {n for n in linears if min(model.get_parameter(n).shape) < 2}
    assert single_input == {f"backbone.layers.{i}.mixer.dt_proj.weight" for i in range(2)}
    expect(where, "rows", linears - single_input)
    expect(where, "decay", single_input | linear_weights(model, "backbone.layers", (nn.Conv1d,)))
    expect(where, "decay", {"backbone.embeddings.weight", "backbone.layers.0.mixer.A_log",
                            "backbone.layers.1.mixer.A_log"})
    expect(where, "no_decay", {"backbone.layers.0.mixer.D", "backbone.norm_f.weight"})


CHECKS = {"bert": check_bert, "vit": check_vit, "gpt2": check_gpt2, "llama": check_llama,
          "resnet": check_resnet, "mamba": check_mamba}


@pytest.mark.parametrize("name", CHECKS)
def test_real_model_is_routed_by_the_rules_and_steps(name):
    model = tiny_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # the head is found: no warning
        groups = param_groups(model)
    assert_each_trainable_parameter_once(model, groups)
    where = routing(groups)
    expect(where, "no_decay", {n for n, p in model.named_parameters() if p.ndim < 2})
    CHECKS[name](model, where)

    opt = NorMuon(groups, lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(name, model).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    moved = [n for n, kind in where.items()
             if kind in ("rows", "columns")
             and not torch.equal(model.get_parameter(n), before[n])]
    assert len(moved) == sum(kind in ("rows", "columns") for kind in where.values())


def test_gpt2_conv1d_output_neurons_get_equal_update_norms():
    model = tiny_model("gpt2")
    opt = NorMuon(param_groups(model), lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of("gpt2", model).backward()
    opt.step()
    for block in model.transformer.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            name = next(n for n, p in model.named_parameters() if p is layer.weight)
            update = layer.weight.detach() - before[name]             # (in, out)
            neuron_norms = update.norm(dim=0)                           # one per output
            assert neuron_norms.max() / neuron_norms.min() - 1 < 1e-3, name
