"""Time DistributedNorMuon's step at several world sizes against the single-device NorMuon on
the same matrices, and print what each rank communicated and how balanced the owners are.

    python bench/distributed_step.py                      # W = 1, 2 on CPU (gloo)
    python bench/distributed_step.py --worlds 1 2 4 --layers 12 --scale 1

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


def measure(args, world: int) -> dict:
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
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
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
    stats = [None] * world
    torch.distributed.all_gather_object(stats, opt.last_step_stats)
    return {"world": world, "times": times, "stats": stats, "flops": opt.ns_flops_per_rank()}


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
    print(f"{'W':>3} {'step ms (min-max)':>22} {'1-device ms':>12} {'ratio':>6} "
          f"{'sent/rank KiB':>14} {'analytic KiB':>13} {'NS max/mean':>12}")
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
        sharded, single = result["times"]["sharded"], result["times"]["single_device"]
        sent = statistics.mean(s["bytes_sent"] for s in result["stats"]) / 1024
        analytic = 4 * elements * (1 - 1 / world) / world / 1024   # 2 + 2 bytes, off-rank
        flops = result["flops"]
        spread = (f"{statistics.median(sharded) * 1e3:.1f} ({min(sharded) * 1e3:.1f}-"
                  f"{max(sharded) * 1e3:.1f})")
        ratio = statistics.median(sharded) / statistics.median(single)
        print(f"{world:>3} {spread:>22} {statistics.median(single) * 1e3:>12.1f} {ratio:>5.2f}x "
              f"{sent:>14.1f} {analytic:>13.1f} {max(flops) / (sum(flops) / len(flops)):>12.3f}")
    print("1-device: normuon.NorMuon on whole copies of the matrices, stepped in turn with the "
          "sharded step on the same ranks and threads")

    print("\nowner balance for the full GPT-2 124M (48 matrices), busiest rank / mean NS FLOPs:")
    full = gpt2_shapes(12, 1)
    for world in (2, 4, 8, 16):
        load = [0] * world
        for shape, owner in zip(full, assign_owners(full, world)):
            load[owner] += newton_schulz_flops(*shape)
        print(f"  W={world:<3} {max(load) / (sum(load) / world):.3f}")


if __name__ == "__main__":
    main()
