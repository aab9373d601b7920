"""Time DistributedNorMuon's step at several world sizes against the single-device NorMuon on
the same matrices, and print what each rank communicated and how balanced the owners are.

    python bench/distributed_step.py                      # W = 1, 2 on CPU (gloo)
    python bench/distributed_step.py --worlds 1 2 4 --layers 12 --scale 1

The matrices are GPT-2 124M's hidden ones (per layer: qkv, attention out, MLP in, MLP out)
with every dimension divided by --scale; --layers of them. Gradients are random. Each world
size runs under torchrun; the median over --repeats steps is reported (after --warmup).
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


def median_step_seconds(opt, params, repeats: int, warmup: int) -> float:
    import torch.distributed as dist
    times = []
    for i in range(warmup + repeats):
        for p in params:
            p.grad = torch.randn_like(p)
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        opt.step()
        if dist.is_initialized():
            dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args, world: int) -> dict:
    """This rank's part: time the sharded step (and, at W = 1, the single-device one)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from distributed import DistributedNorMuon
    from normuon import NorMuon

    torch.manual_seed(0)
    shapes = gpt2_shapes(args.layers, args.scale)
    model = nn.ParameterList(nn.Parameter(torch.randn(m, n) / n ** 0.5) for m, n in shapes)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = DistributedNorMuon(model.parameters(), compile=args.compile)
    seconds = median_step_seconds(opt, list(model.parameters()), args.repeats, args.warmup)
    stats = [None] * world
    torch.distributed.all_gather_object(stats, opt.last_step_stats)
    result = {"world": world, "seconds": seconds, "stats": stats,
              "flops": opt.ns_flops_per_rank()}
    if world == 1:
        plain = [nn.Parameter(torch.randn(m, n)) for m, n in shapes]
        result["single_device_seconds"] = median_step_seconds(
            NorMuon(plain), plain, args.repeats, args.warmup)
    return result


def worker(args) -> None:
    """One rank of a torchrun launch; rank 0 writes the figures to args.out."""
    import gc

    import torch.distributed as dist
    dist.init_process_group("gloo")
    result = measure(args, dist.get_world_size())
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    # free the sharded model (and with it the device mesh's hold on the process group) now:
    # a gloo group torn down at interpreter exit can abort the process
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
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
    print(f"{'W':>3} {'step ms':>9} {'vs 1-device':>12} {'sent/rank KiB':>14} "
          f"{'analytic KiB':>13} {'NS max/mean':>12}")
    single = None
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={world}", __file__, "--worker", "--out", str(out),
                       "--layers", str(args.layers), "--scale", str(args.scale),
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            if args.compile:
                command.append("--compile")
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
            subprocess.run(command, check=True, env=env, capture_output=True)
            result = json.loads(out.read_text())
        single = result.get("single_device_seconds", single)
        sent = statistics.mean(s["bytes_sent"] for s in result["stats"]) / 1024
        analytic = 4 * elements * (1 - 1 / world) / world / 1024   # 2 + 2 bytes, off-rank
        flops = result["flops"]
        ratio = f"{result['seconds'] / single:.2f}x" if single else "-"
        print(f"{world:>3} {result['seconds'] * 1e3:>9.1f} {ratio:>12} {sent:>14.1f} "
              f"{analytic:>13.1f} {max(flops) / (sum(flops) / len(flops)):>12.3f}")
    if single:
        print(f"single-device NorMuon: {single * 1e3:.1f} ms per step")

    print("\nowner balance for the full GPT-2 124M (48 matrices), busiest rank / mean NS FLOPs:")
    full = gpt2_shapes(12, 1)
    for world in (2, 4, 8, 16):
        load = [0] * world
        for shape, owner in zip(full, assign_owners(full, world)):
            load[owner] += newton_schulz_flops(*shape)
        print(f"  W={world:<3} {max(load) / (sum(load) / world):.3f}")


if __name__ == "__main__":
    main()
