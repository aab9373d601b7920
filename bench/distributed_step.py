"""Time DistributedNorMuon's step at several world sizes against the single-device NorMuon on
the same matrices, and print what each rank communicated and how balanced the owners are.

    python bench/distributed_step.py                      # W = 1, 2 and HSDP 2x2, CPU (gloo)
    python bench/distributed_step.py --layouts 1 2 4 2x2 --layers 12 --scale 1

A layout is W (FSDP2 over W ranks) or RxS (HSDP: R replica groups of S ranks each).

The matrices are GPT-2 124M's hidden ones (per layer: qkv, attention out, MLP in, MLP out)
with every dimension divided by --scale; --layers of them. Gradients are random. Each world
size runs under torchrun, where the sharded step and the single-device NorMuon (on whole
copies, same ranks and threads) are stepped in turn for --repeats rounds after --warmup: the
median and min-max are reported, and the ratio of medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distributed import assign_owners  # noqa: E402
from normuon import newton_schulz_flops  # noqa: E402
from train_gpt import hidden_matrix_shapes  # noqa: E402


def gpt2_shapes(layers: int, scale: int) -> list[tuple[int, int]]:
    """GPT-2 124M's hidden matrices (width 768) with every dimension divided by `scale`."""
    return hidden_matrix_shapes(layers, 768 // scale)


def timed_step(opt, params) -> float:
    """One step with fresh random gradients, every rank starting and ending together."""
    import torch.distributed as dist
    for p in params:
        p.grad = torch.randn_like(p)
    dist.barrier()
    start = time.perf_counter()
    opt.step()
    dist.barrier()
    return time.perf_counter() - start


def parse_layout(layout: str) -> tuple[int, int]:
    """"W" -> (1, W); "RxS" -> (R, S): replica groups and ranks per group."""
    replicas, _, shards = layout.rpartition("x")
    return int(replicas or 1), int(shards)


def measure(args, replicas: int, shards: int) -> dict:
    """This rank's part: the sharded step and, on the same threads, the single-device NorMuon
    on whole copies of the matrices (every rank steps its own: what one process would do),
    stepped in turn round after round after the same warm-up."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from distributed import DistributedNorMuon
    from normuon import NorMuon

    torch.manual_seed(0)
    shapes = gpt2_shapes(args.layers, args.scale)
    model = nn.ParameterList(nn.Parameter(torch.randn(m, n) / n ** 0.5) for m, n in shapes)
    mesh = (init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))
            if replicas > 1
            else init_device_mesh("cpu", (shards,)))
    fully_shard(model, mesh=mesh)
    plain = [nn.Parameter(torch.randn(m, n) / n ** 0.5) for m, n in shapes]
    variants = {"sharded": (DistributedNorMuon(model.parameters(), compile=args.compile),
                            list(model.parameters())),
                "single_device": (NorMuon(plain), plain)}
    times = {name: [] for name in variants}
    for round_ in range(args.warmup + args.repeats):
        for name, (opt, params) in variants.items():
            seconds = timed_step(opt, params)
            if round_ >= args.warmup:
                times[name].append(seconds)
    opt = variants["sharded"][0]
    stats = [None] * (replicas * shards)
    torch.distributed.all_gather_object(stats, opt.last_step_stats)
    return {"times": times, "stats": stats, "flops": opt.ns_flops_per_rank()}


def worker(args) -> None:
    """One rank of a torchrun launch; rank 0 writes the figures to args.out."""
    import gc

    import torch.distributed as dist
    dist.init_process_group("gloo")
    result = measure(args, *parse_layout(args.layout))
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    # free the sharded model (and with it the device mesh's hold on the process group) now:
    # a gloo group torn down at interpreter exit can abort the process
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["1", "2", "2x2"],
                        help="W for FSDP2 over W ranks, RxS for HSDP")
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scale", type=int, default=4, help="divide GPT-2's dims by this")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    shapes = gpt2_shapes(args.layers, args.scale)
    elements = sum(m * n for m, n in shapes)
    print(f"{len(shapes)} matrices, GPT-2 shapes / {args.scale}, {elements / 1e6:.2f}M "
          f"elements; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"{'layout':>6} {'step ms (min-max)':>22} {'1-device ms':>12} {'ratio':>6} "
          f"{'sent/rank KiB':>14} {'analytic KiB':>13} {'NS max/mean':>12}")
    for layout in args.layouts:
        replicas, shards = parse_layout(layout)
        world = replicas * shards
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={world}", __file__, "--worker", "--out", str(out),
                       "--layout", layout,
                       "--layers", str(args.layers), "--scale", str(args.scale),
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            if args.compile:
                command.append("--compile")
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
            subprocess.run(command, check=True, env=env, capture_output=True)
            result = json.loads(out.read_text())
        sharded, single = result["times"]["sharded"], result["times"]["single_device"]
        sent = statistics.mean(s["bytes_sent"] for s in result["stats"]) / 1024
        # 2 + 2 bytes per element that crosses ranks, within a replica group
        analytic = 4 * elements * (1 - 1 / shards) / shards / 1024
        flops = result["flops"]
        spread = (f"{statistics.median(sharded) * 1e3:.1f} ({min(sharded) * 1e3:.1f}-"
                  f"{max(sharded) * 1e3:.1f})")
        ratio = statistics.median(sharded) / statistics.median(single)
        print(f"{layout:>6} {spread:>22} {statistics.median(single) * 1e3:>12.1f} {ratio:>5.2f}x "
              f"{sent:>14.1f} {analytic:>13.1f} {max(flops) / (sum(flops) / len(flops)):>12.3f}")
    print("1-device: normuon.NorMuon on whole copies of the matrices, stepped in turn with the "
          "sharded step on the same ranks and threads")

    print("\nowner balance for the full GPT-2 124M (48 matrices), busiest rank / mean NS FLOPs:")
    full = gpt2_shapes(12, 1)
    for world in (2, 4, 8, 16):
        load = [0] * world
        costs = [newton_schulz_flops(*shape) for shape in full]
        for cost, owner in zip(costs, assign_owners(costs, world)):
            load[owner] += cost
        print(f"  W={world:<3} {max(load) / (sum(load) / world):.3f}")
    hsdp_choice(full)


def hsdp_choice(shapes: list[tuple[int, int]]) -> None:
    """Where HSDP should orthogonalize, for GPT-2 124M on R nodes of S GPUs: owners within each
    replica group (what distributed.py does; every group repeats the work, nothing crosses
    nodes) or owners over the whole mesh (each does 1/R of it, but every O must reach all R
    groups: 2 bytes per element to each of the R - 1 other nodes)."""
    total_flops = sum(newton_schulz_flops(*shape) for shape in shapes)
    elements = sum(m * n for m, n in shapes)
    print("\nHSDP, GPT-2 124M: Newton-Schulz GFLOP and inter-node MB per rank per step")
    print(f"{'RxS':>6} {'per group: GFLOP':>17} {'inter-node MB':>14} "
          f"{'whole mesh: GFLOP':>18} {'inter-node MB':>14}")
    for replicas, shards in ((2, 8), (4, 8), (8, 8)):
        ranks = replicas * shards
        across = 2 * elements * (replicas - 1) / ranks / 1e6
        print(f"{f'{replicas}x{shards}':>6} {total_flops / shards / 1e9:>17.1f} {0.0:>14.1f} "
              f"{total_flops / ranks / 1e9:>18.1f} {across:>14.1f}")


if __name__ == "__main__":
    main()
