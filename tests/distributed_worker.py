"""Scenarios for tests/test_distributed.py, run on real process groups:

    torchrun --nproc_per_node=W tests/distributed_worker.py SCENARIO OUT_DIR

Each rank runs the scenario; rank 0 writes OUT_DIR/SCENARIO.json for the test to check.
"""
import copy
import gc
import json
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed import DistributedNorMuon  # noqa: E402
from normuon import NorMuon, param_groups  # noqa: E402
from train_gpt import hidden_matrix_shapes  # noqa: E402


class UnevenModel(nn.Module):
    """Row counts that no world size divides, a 2-row matrix (empty shards at W >= 3), two
    same-shape matrices, a conv kernel, an unused layer (no gradient), embeddings and biases."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 7, bias=False)
        self.c = nn.Linear(7, 13, bias=False)
        self.d = nn.Linear(13, 13, bias=False)
        self.e = nn.Linear(13, 13, bias=False)
        self.conv = nn.Conv1d(13, 5, 3)
        self.tiny = nn.Linear(5, 2, bias=False)
        self.unused = nn.Linear(4, 3)

    def forward(self, idx):                                   # idx: (B, T)
        # a nonlinearity after every layer and more tokens than any width keep the gradients
        # full-rank: the exact polar factor of a near-singular matrix is ill-conditioned
        x = torch.tanh(self.a(self.embed(idx)))
        for layer in (self.b, self.c, self.d, self.e):
            x = torch.tanh(layer(x))
        x = torch.tanh(self.conv(x.transpose(1, 2)).transpose(1, 2))   # (B, T - 2, 5)
        return (self.tiny(x) - 0.5).square().mean()


def batch(step):
    return torch.randint(0, 11, (8, 20), generator=torch.Generator().manual_seed(100 + step))


def new_model():
    torch.manual_seed(0)
    return UnevenModel()


def make_groups(model):
    return param_groups(model, head=())   # its last layer is a hidden matrix here too


def train(model, opt, steps, first_step=0, gradients="backward"):
    """Step `steps` times. gradients="random": seeded full-rank gradients, the same on every
    rank (sharded like the parameter), instead of a backward pass; "unused" gets none."""
    for step in range(first_step, first_step + steps):
        if gradients == "backward":
            model(batch(step)).backward()
        else:
            generator = torch.Generator().manual_seed(1000 + step)
            for name, p in model.named_parameters():
                full = torch.randn(p.shape, generator=generator)
                if "unused" not in name:
                    p.grad = (distribute_tensor(full, p.device_mesh, p.placements)
                              if isinstance(p, DTensor) else full)
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model):
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def relative_error(a, b, reference_start):
    """Max over parameters of |a - b| / |b - start|: error relative to the change, so that a
    small error in the update cannot hide under the parameters' own magnitude."""
    worst = 0.0
    for name in b:
        change = (b[name] - reference_start[name]).abs().max().item()
        error = (a[name] - b[name]).abs().max().item()
        worst = max(worst, error / change if change > 0 else error)
    return worst


def sharded(model, mesh):
    fully_shard(model, mesh=mesh)
    return model


CONFIGS = [dict(algorithm=alg, adjust_lr=adj, orthogonalizer=orth)
           for alg in ("normuon", "muon") for adj in ("match_rms_adamw", "original")
           for orth in ("svd", "newton_schulz")] + [
    # the Gram form: the conv (5, 39) and tiny (2, 5) matrices take it (aspect >= 2), the
    # others the plain iteration, on each matrix's owner
    dict(algorithm="normuon", adjust_lr="match_rms_adamw", orthogonalizer="gram_newton_schulz")]
HYPER = dict(lr=0.02, weight_decay=0.1)


def scenario_parity(world, rank, mesh):
    """FSDP2 and DDP runs against the unsharded single-device optimizer, on seeded random
    full-rank gradients. The narrow model's own gradients are nearly singular, and there both
    orthogonalizers amplify rounding: the exact polar factor turns 1e-7 differences in the
    averaged gradients into 1e-3, and Newton-Schulz's steep middle does the same to bf16
    rounding of another reduction order. So real backward passes are checked separately
    (backward_error), to bf16 tolerance."""
    start = full_params(new_model())
    results = []
    for config in CONFIGS:
        reference = new_model()
        train(reference, NorMuon(make_groups(reference), **HYPER, **config), 5,
              gradients="random")
        expected = full_params(reference)

        model = sharded(new_model(), mesh)
        opt = DistributedNorMuon(make_groups(model), **HYPER, **config, compile=False)
        train(model, opt, 5, gradients="random")
        fsdp_error = relative_error(full_params(model), expected, start)
        frozen_untouched = torch.equal(full_params(model)["unused.weight"],
                                       start["unused.weight"])

        replicated = DistributedDataParallel(new_model(), find_unused_parameters=True)
        ddp_opt = DistributedNorMuon(make_groups(replicated.module), **HYPER, **config,
                                     compile=False)
        train(replicated, ddp_opt, 5, gradients="random")
        ddp_error = relative_error(full_params(replicated.module), expected, start)

        backward_error = None
        if config["orthogonalizer"] == "newton_schulz":
            reference = new_model()
            train(reference, NorMuon(make_groups(reference), **HYPER, **config), 5)
            model = sharded(new_model(), mesh)
            train(model, DistributedNorMuon(make_groups(model), **HYPER, **config,
                                            compile=False), 5)
            backward_error = relative_error(full_params(model), full_params(reference), start)
        results.append(dict(config, fsdp_error=fsdp_error, ddp_error=ddp_error,
                            backward_error=backward_error, frozen_untouched=frozen_untouched))
    return results


def gpt_shaped_model(layers=2, scale=8):
    """The hidden matrices of GPT-2 124M's blocks, each dimension divided by `scale`."""
    torch.manual_seed(0)
    shapes = hidden_matrix_shapes(layers, 768 // scale)
    return nn.ParameterList(nn.Parameter(torch.randn(m, n) / n ** 0.5) for m, n in shapes)


def scenario_communication(world, rank, mesh):
    """Bytes each rank sent and received in one Newton-Schulz step, and the layout."""
    model = sharded(gpt_shaped_model(), mesh)
    opt = DistributedNorMuon(model.parameters(), **HYPER, compile=False)
    train(model, opt, 1, gradients="random")
    stats = [None] * world
    dist.all_gather_object(stats, opt.last_step_stats)
    matrices = [dict(shape=list(p.shape), owner=opt.owner[p]) for p in opt.owner]
    return dict(stats=stats, matrices=matrices, flops=opt.ns_flops_per_rank())


def scenario_checkpoint(world, rank, mesh, out_dir):
    """DCP: complete at construction; save at step 3 and resume bit-exactly; and write the
    step-3 checkpoint for scenario_reshard to load at another world size."""
    config = dict(orthogonalizer="svd")
    model = sharded(new_model(), mesh)
    opt = DistributedNorMuon(make_groups(model), **HYPER, **config, compile=False)
    empty_state = get_optimizer_state_dict(model, opt)["state"]
    complete_at_construction = all("momentum_buffer" in empty_state.get(name, {})
                                   for name in ("a.weight", "conv.weight", "tiny.weight"))
    train(model, opt, 3, gradients="random")
    checkpoint = out_dir / f"dcp_w{world}"
    save_checkpoint(model, opt, checkpoint)
    train(model, opt, 3, first_step=3, gradients="random")
    straight = full_params(model)

    resumed = sharded(new_model(), mesh)
    resumed_opt = DistributedNorMuon(make_groups(resumed), **HYPER, **config, compile=False)
    load_checkpoint(resumed, resumed_opt, checkpoint)
    train(resumed, resumed_opt, 3, first_step=3, gradients="random")
    after = full_params(resumed)
    bit_exact = all(torch.equal(after[n], straight[n]) for n in straight)
    second_moment_dtype = str(resumed_opt.state[resumed.a.weight]["second_moment"].dtype)
    return dict(complete_at_construction=complete_at_construction, bit_exact=bit_exact,
                second_moment_dtype=second_moment_dtype)


def save_checkpoint(model, opt, checkpoint):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=checkpoint)


def load_checkpoint(model, opt, checkpoint):
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def error_after_resuming(mesh, checkpoint):
    """Load a step-3 checkpoint (svd) onto a model sharded over `mesh`, take 3 steps: the
    error against 6 single-device steps."""
    model = sharded(new_model(), mesh)
    opt = DistributedNorMuon(make_groups(model), **HYPER, orthogonalizer="svd", compile=False)
    load_checkpoint(model, opt, checkpoint)
    train(model, opt, 3, first_step=3, gradients="random")
    reference = new_model()
    start = full_params(reference)
    train(reference, NorMuon(make_groups(reference), **HYPER, orthogonalizer="svd"), 6,
          gradients="random")
    return relative_error(full_params(model), full_params(reference), start)


def scenario_reshard(world, rank, mesh, out_dir):
    """Load the 2-rank step-3 checkpoint at this world size, take 3 steps, compare with 6
    single-device steps."""
    return dict(error=error_after_resuming(mesh, out_dir / "dcp_w2"))


def scenario_compile(world, rank, mesh):
    """Compiled against eager (Newton-Schulz), and an lr change that must not recompile.
    Inductor fuses the bf16 iteration and rounds in other places than eager, so the two agree
    to bf16 precision, on full-rank gradients (near-singular ones amplify any rounding)."""
    import torch._dynamo
    eager = sharded(new_model(), mesh)
    eager_opt = DistributedNorMuon(make_groups(eager), **HYPER, compile=False)
    compiled = sharded(new_model(), mesh)
    compiled_opt = DistributedNorMuon(make_groups(compiled), **HYPER, compile=True)
    start = full_params(new_model())
    train(eager, eager_opt, 2, gradients="random")
    train(compiled, compiled_opt, 2, gradients="random")
    torch._dynamo.config.error_on_recompile = True
    recompiled = False
    for opt in (eager_opt, compiled_opt):
        for group in opt.param_groups:
            group["lr"] *= 0.5
    try:
        train(eager, eager_opt, 2, first_step=2, gradients="random")
        train(compiled, compiled_opt, 2, first_step=2, gradients="random")
    except Exception as error:   # dynamo raises on a recompilation
        recompiled = repr(error)[:500]
    error = relative_error(full_params(compiled), full_params(eager), start)
    return dict(error=error, recompiled=recompiled)


def scenario_refusals(world, rank, mesh):
    """What DistributedNorMuon cannot do is refused at construction (or copy), on every rank:
    each case's error message on each rank (None where it was accepted)."""
    def message(action, errors=(ValueError,)):
        try:
            action()
        except errors as error:
            return str(error)
        return None

    transposed = sharded(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)), mesh)
    # every rank shards its parameters over a mesh of itself alone, not the optimizer's group
    alone = init_device_mesh("cpu", (world, 1), mesh_dim_names=("group", "alone"))["alone"]
    other_mesh = sharded(nn.Linear(4, 8), alone)
    opt = DistributedNorMuon(make_groups(sharded(new_model(), mesh)), compile=False)
    result = dict(
        in_out=message(lambda: DistributedNorMuon(
            [{"params": list(transposed.parameters())[::2], "layout": "in_out"}])),
        other_mesh=message(lambda: DistributedNorMuon(make_groups(other_mesh))),
        deepcopy=message(lambda: copy.deepcopy(opt), TypeError),
        pickle=message(lambda: pickle.dumps(opt), TypeError))
    return gather(result)


def gather(result):
    """Every rank's result, in rank order (on rank 0, which writes them)."""
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    return results


def scenario_gradient_mismatch(world, rank, mesh):
    """Rank 1 lacks one matrix's gradient; then rank 1 has no gradients at all. Every rank must
    raise the same error, nothing updated, and the group must stay usable (no abort, no hang).
    """
    model = sharded(new_model(), mesh)
    opt = DistributedNorMuon(make_groups(model), **HYPER, compile=False)
    train(model, opt, 1, gradients="random")
    results = {}
    for case, drop in (("one_missing", lambda name: name == "c.weight"),
                       ("all_missing", lambda name: True)):
        before = full_params(model)
        generator = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            full = torch.randn(p.shape, generator=generator)
            p.grad = distribute_tensor(full, p.device_mesh, p.placements)
            if rank == 1 and drop(name):
                p.grad = None
        try:
            opt.step()
            error = None
        except RuntimeError as raised:
            error = str(raised)
        opt.zero_grad(set_to_none=True)
        unchanged = all(torch.equal(before[n], p) for n, p in full_params(model).items())
        results[case] = dict(error=error, unchanged=unchanged)
    train(model, opt, 1, first_step=1, gradients="random")   # and it still steps
    return gather(results)


def hsdp_mesh(replicas, world):
    return init_device_mesh("cpu", (replicas, world // replicas),
                            mesh_dim_names=("replicate", "shard"))


def scenario_hsdp_parity(world, rank, mesh):
    """HSDP on a 2 x (world/2) mesh against the single-device optimizer (exact polar factor),
    both algorithms and both adjust_lr modes; and the per-rank bytes and FLOPs."""
    mesh = hsdp_mesh(2, world)
    start = full_params(new_model())
    results = []
    for algorithm in ("normuon", "muon"):
        for adjust_lr in ("match_rms_adamw", "original"):
            config = dict(algorithm=algorithm, adjust_lr=adjust_lr, orthogonalizer="svd")
            reference = new_model()
            train(reference, NorMuon(make_groups(reference), **HYPER, **config), 5,
                  gradients="random")
            model = sharded(new_model(), mesh)
            opt = DistributedNorMuon(make_groups(model), **HYPER, **config, compile=False)
            train(model, opt, 5, gradients="random")
            error = relative_error(full_params(model), full_params(reference), start)
            results.append(dict(config, error=error, row_world=opt.world,
                                replicas=opt.replicas, stats=opt.last_step_stats,
                                flops=opt.ns_flops_per_rank()))
    return gather(results)


def scenario_hsdp_save(world, rank, mesh, out_dir):
    """Three HSDP steps on a 2 x 2 mesh, saved with DCP for scenario_hsdp_load."""
    model = sharded(new_model(), hsdp_mesh(2, world))
    opt = DistributedNorMuon(make_groups(model), **HYPER, orthogonalizer="svd", compile=False)
    train(model, opt, 3, gradients="random")
    save_checkpoint(model, opt, out_dir / "dcp_hsdp")
    return dict(saved=True)


def scenario_hsdp_load(world, rank, mesh, out_dir):
    """Load the 2 x 2 checkpoint on a 1 x world (2 ranks) or world x 1 (4 ranks) mesh, take 3
    steps, compare with 6 single-device steps."""
    replicas = 1 if world == 2 else world
    error = error_after_resuming(hsdp_mesh(replicas, world), out_dir / "dcp_hsdp")
    return dict(error=error, mesh=[replicas, world // replicas])


def scenario_grouped(world, rank, mesh):
    """A grouped conv of 3 groups of 3 output channels, sharded by rows (W=2: 5 and 4 rows, so
    the middle group is cut by the shard boundary), against the single-device optimizer."""
    def new_convs():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(6, 9, 3, groups=3), nn.Conv2d(4, 10, 3, groups=2),
                             nn.Linear(5, 7))
    start = full_params(new_convs())
    results = []
    for algorithm in ("normuon", "muon"):
        for adjust_lr in ("match_rms_adamw", "original"):
            config = dict(HYPER, algorithm=algorithm, adjust_lr=adjust_lr, orthogonalizer="svd")
            reference = new_convs()
            train(reference, NorMuon(param_groups(reference, head=()), **config), 5,
                  gradients="random")
            model = sharded(new_convs(), mesh)
            opt = DistributedNorMuon(param_groups(model, head=()), **config, compile=False)
            train(model, opt, 5, gradients="random")
            blocks = sorted(g["blocks"] for g in opt.param_groups if g["algorithm"] != "adamw")
            results.append(dict(config, blocks=blocks, error=relative_error(
                full_params(model), full_params(reference), start)))
    return results


class StackedExperts(nn.Module):
    """Four experts' (E, out, in) weights, as an experts module stores them."""
    num_experts = 4

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6, 5) / 3)

    def forward(self, x):                                     # x: (B, T, 5)
        return torch.einsum("bti,eoi->bteo", x, self.weight).mean(-2)


def block_groups(model, **options):
    """Fused weights split in blocks: unequal (cut by shard boundaries at W = 2 and 3), equal,
    and stacked experts' (stepped locally, whole experts per rank)."""
    return [{"params": [model[0].weight], "split_sizes": [2, 3, 4]},
            {"params": [model[1].weight], "split_sizes": [4, 4, 4]},
            {"params": [model[2].weight], "split_sizes": [2, 4], "layout": "experts_out_in"},
            {"params": [model[0].bias], "algorithm": "adamw", **options}]


def scenario_blocks(world, rank, mesh):
    """split_sizes and cautious weight decay under FSDP2 against the single-device optimizer."""
    def new_blocks():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 9), nn.Linear(5, 12, bias=False), StackedExperts())
    start = full_params(new_blocks())
    results = []
    for algorithm in ("normuon", "muon"):
        for adjust_lr in ("match_rms_adamw", "original"):
            for cautious in (False, True):
                config = dict(HYPER, algorithm=algorithm, adjust_lr=adjust_lr,
                              orthogonalizer="svd", cautious_weight_decay=cautious)
                reference = new_blocks()
                train(reference, NorMuon(block_groups(reference), **config), 5,
                      gradients="random")
                model = sharded(new_blocks(), mesh)
                opt = DistributedNorMuon(block_groups(model), **config, compile=False)
                train(model, opt, 5, gradients="random")
                results.append(dict(config, exchanged=len(opt.owner), error=relative_error(
                    full_params(model), full_params(reference), start)))
    return results


def tiny_mixtral():
    """A Mixtral from a tiny config: 4 experts stacked (E, out, in) per layer, routers."""
    from cpu_torchvision import define_missing_ops
    define_missing_ops()   # transformers imports torchvision where it is installed
    import transformers
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))


def sharded_mixtral(mesh):
    model = tiny_mixtral()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return sharded(model, mesh)


def scenario_moe(world, rank, mesh, out_dir):
    """A tiny Mixtral under FSDP2, experts sharded on their expert dim (W=3: 2, 2 and 0 experts
    per rank), against the single-device optimizer (exact polar factor): 5 steps. At W=2 a
    3-step DCP checkpoint is saved; at W=3 it is loaded and stepped 3 more."""
    config = dict(HYPER, orthogonalizer="svd")
    start = full_params(tiny_mixtral())
    reference = tiny_mixtral()
    reference_opt = NorMuon(param_groups(reference), **config)
    train(reference, reference_opt, 3, gradients="random")
    after_three = full_params(reference)
    train(reference, reference_opt, 2, first_step=3, gradients="random")
    model = sharded_mixtral(mesh)
    opt = DistributedNorMuon(param_groups(model), **config, compile=False)
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    train(model, opt, 3, gradients="random")
    result = dict(local_experts=experts.to_local().shape[0],
                  exchanged=sum(1 for p in opt.owner if p is experts))
    if world == 2:
        save_checkpoint(model, opt, out_dir / "dcp_moe")
    train(model, opt, 2, first_step=3, gradients="random")
    result["error"] = relative_error(full_params(model), full_params(reference), start)
    if world == 3 and (out_dir / "dcp_moe").exists():
        resumed = sharded_mixtral(mesh)
        resumed_opt = DistributedNorMuon(param_groups(resumed), **config, compile=False)
        load_checkpoint(resumed, resumed_opt, out_dir / "dcp_moe")
        loaded_error = relative_error(full_params(resumed), after_three, start)
        train(resumed, resumed_opt, 2, first_step=3, gradients="random")
        result["resumed_error"] = max(loaded_error, relative_error(
            full_params(resumed), full_params(reference), start))
    return gather(result)


def main():
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    function = globals()[f"scenario_{scenario}"]
    needs_dir = "out_dir" in function.__code__.co_varnames[:function.__code__.co_argcount]
    result = function(world, rank, mesh, out_dir) if needs_dir else function(world, rank, mesh)
    if rank == 0:
        (out_dir / f"{scenario}_w{world}.json").write_text(json.dumps(result, indent=1))
    gc.collect()   # free sharded models now: a gloo group torn down at exit can abort
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
