"""The orthogonalization alone, per matrix shape: Newton-Schulz as NorMuon runs it by default
(the plain iteration in bf16), the plain iteration in float32, and the Gram form
(orthogonalizer="gram_newton_schulz", which computes in float32), stepped in turn.

    python bench/orthogonalizers.py                   # GPT-2 124M's shapes and aspect ratios
    python bench/orthogonalizers.py --width 192       # the same aspect ratios, small: seconds
    python bench/orthogonalizers.py --no-bf16         # skip bf16 (on CPUs without bf16 units)

The Gram form computes in float32 and the default iteration in bf16, so their ratio mixes two
things: the algorithm and the speed of float32 against bf16 matmuls on this machine. The plain
iteration in float32 separates them: gram / plain float32 is what the algorithm saves, from
which normuon.GRAM_MIN_ASPECT (the aspect ratio from which the Gram form is used) is set.

Method: one (width*aspect, width) matrix per aspect ratio (the transposes are the same work);
after one warm-up call of each, every round times each variant on each shape in an order that
rotates from round to round. Reported: median ms and min-max per variant and shape, and the
ratios of medians, with the matmul FLOPs of each form.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import normuon  # noqa: E402
from normuon import (NEWTON_SCHULZ_COEFFICIENTS, gram_iterations,  # noqa: E402
                     gram_iterations_flops, newton_schulz, newton_schulz_flops,
                     polynomial_iterations)
from train_gpt import synchronize  # noqa: E402

ASPECTS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)   # GPT-2: attention proj 1, c_attn 3, MLP 4


def plain_float32(U: torch.Tensor) -> torch.Tensor:
    X = U.float()[None]
    A = X.new_empty(1, min(U.shape), min(U.shape))
    return polynomial_iterations(X, [NEWTON_SCHULZ_COEFFICIENTS] * 5, 1.0,
                                 (A, torch.empty_like(A), torch.empty_like(X)))


def gram_float32(U: torch.Tensor) -> torch.Tensor:
    return gram_iterations(U.float()[None], [NEWTON_SCHULZ_COEFFICIENTS] * 5, 1.0)


VARIANTS = {"newton_schulz (bf16)": newton_schulz, "plain float32": plain_float32,
            "gram float32": gram_float32}


def measure(width: int, rounds: int, device: torch.device, variants: dict) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [(round(width * aspect), width) for aspect in ASPECTS]
    inputs = {s: torch.randn(s, generator=gen, device=device).bfloat16() for s in shapes}
    jobs = [(name, s) for s in shapes for name in variants]
    for name, s in jobs:                                   # warm-up, off the clock
        variants[name](inputs[s])
    times = {job: [] for job in jobs}
    for round_ in range(rounds):
        shift = round_ % len(jobs)
        for name, s in jobs[shift:] + jobs[:shift]:
            synchronize(device)
            start = time.perf_counter()
            variants[name](inputs[s])
            synchronize(device)
            times[(name, s)].append(time.perf_counter() - start)
    return {"shapes": shapes, "times_s": times}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=768, help="the short side (GPT-2: 768)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip the bf16 iteration (minutes per call on a CPU without bf16 "
                             "units)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_bf16 and "bf16" in k)}
    result = measure(args.width, args.rounds, device, variants)
    median = {job: statistics.median(t) for job, t in result["times_s"].items()}
    print(f"one matrix per shape on {device}; torch {torch.__version__}; {args.rounds} rounds "
          f"after 1 warm-up call; normuon.GRAM_MIN_ASPECT = {normuon.GRAM_MIN_ASPECT}\n")
    header = "".join(f"{name + ' ms':>24}" for name in variants)
    print(f"{'shape':<13}{'aspect':>7}{header}{'gram / plain f32':>18}{'gram / bf16':>13}"
          f"{'FLOPs gram / plain':>20}")
    rows = []
    for (m, n), aspect in zip(result["shapes"], ASPECTS):
        cells = "".join(f"{median[(name, (m, n))] * 1e3:>10.1f} "
                        f"({min(result['times_s'][(name, (m, n))]) * 1e3:.0f}-"
                        f"{max(result['times_s'][(name, (m, n))]) * 1e3:.0f})".rjust(24)
                        for name in variants)
        gram = median[("gram float32", (m, n))]
        versus_f32 = gram / median[("plain float32", (m, n))]
        versus_bf16 = (gram / median[("newton_schulz (bf16)", (m, n))]
                       if "newton_schulz (bf16)" in variants else None)
        flops = gram_iterations_flops(m, n) / newton_schulz_flops(m, n)
        print(f"{f'{m}x{n}':<13}{aspect:>7.1f}{cells}{versus_f32:>18.2f}"
              f"{'-' if versus_bf16 is None else f'{versus_bf16:.2f}':>13}"
              f"{flops:>20.2f}")
        rows.append(dict(shape=[m, n], aspect=aspect, gram_over_plain_float32=versus_f32,
                         gram_over_bf16=versus_bf16, flops_ratio=flops))
    summary = {"device": str(device), "torch": torch.__version__, "width": args.width,
               "rounds": args.rounds, "rows": rows,
               "median_s": {f"{name} {m}x{n}": t for (name, (m, n)), t in median.items()}}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
