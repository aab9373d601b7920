"""Optimizer step time on GPT-2 124M's hidden matrices: ours against the peers and the limit.

    python bench/optimizer_step.py             # the 48 matrices of GPT-2 124M
    python bench/optimizer_step.py --small     # GPT-2 shapes / 4, 2 layers: seconds
    python bench/optimizer_step.py --device cuda

Times, in one run, the median step (after warm-up) of: our normuon and muon, eager and compiled
(torch.compile(opt.step)), torch.optim.Muon and torch.optim.AdamW. The limit is the
orthogonalizer's matmuls alone: their FLOPs (5 Newton-Schulz steps per matrix) at the
machine's bf16 matmul rate, measured here on a square matmul. Ratios are printed against it.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed import newton_schulz_flops  # noqa: E402
from normuon import NorMuon  # noqa: E402


def gpt2_shapes(layers: int, scale: int) -> list[tuple[int, int]]:
    d = 768 // scale
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int) -> float:
    """bf16 FLOP/s of an (n, n) @ (n, n) matmul, the best of several."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def median_step(make_optimizer, shapes, device, repeats: int, warmup: int,
                compile: bool = False) -> float:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(m, n, device=device) / n ** 0.5) for m, n in shapes]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = make_optimizer(params)
    step = torch.compile(opt.step) if compile else opt.step
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# eager first: once something has compiled, Inductor's worker processes can keep a small
# machine's cores busy for a while and slow whatever is timed next
VARIANTS = {
    "normuon (ours)": (lambda ps: NorMuon(ps, lr=1e-3), False),
    "muon (ours)": (lambda ps: NorMuon(ps, lr=1e-3, algorithm="muon",
                                       adjust_lr="original"), False),
    "torch.optim.Muon": (lambda ps: torch.optim.Muon(ps, lr=1e-3), False),
    "torch.optim.AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), False),
    "normuon (ours, compiled)": (lambda ps: NorMuon(ps, lr=1e-3), True),
    "muon (ours, compiled)": (lambda ps: NorMuon(ps, lr=1e-3, algorithm="muon",
                                                 adjust_lr="original"), True),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="GPT-2 shapes / 4, 2 layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip compiled variants")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = gpt2_shapes(2, 4) if args.small else gpt2_shapes(12, 1)

    rate = matmul_rate(device, 1024 if args.small else 4096)
    flops = sum(newton_schulz_flops(m, n) for m, n in shapes)
    limit = flops / rate
    print(f"{len(shapes)} matrices ({'GPT-2 / 4, 2 layers' if args.small else 'GPT-2 124M'}), "
          f"{sum(m * n for m, n in shapes) / 1e6:.1f}M elements on {device}; "
          f"torch {torch.__version__}")
    print(f"bf16 matmul rate {rate / 1e12:.2f} TFLOP/s; Newton-Schulz {flops / 1e9:.1f} GFLOP "
          f"-> limit {limit * 1e3:.2f} ms per step\n")
    print(f"{'optimizer':<28}{'median ms':>11}{'x limit':>9}{'x AdamW':>9}")
    results = {}
    for name, (make, compiled) in VARIANTS.items():
        if compiled and args.no_compile:
            continue
        results[name] = median_step(make, shapes, device, args.repeats, args.warmup, compiled)
    adamw = results["torch.optim.AdamW"]
    for name, seconds in results.items():
        print(f"{name:<28}{seconds * 1e3:>11.2f}{seconds / limit:>9.2f}{seconds / adamw:>9.2f}")
    summary = {"device": str(device), "shapes": shapes, "matmul_flops_per_s": rate,
               "newton_schulz_flops": flops, "limit_s": limit, "median_s": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
