"""Optimizer step time and memory on a GPT's hidden matrices: ours against the peers and the
matmul limit, every variant stepped in turn in one process.

    python bench/optimizer_step.py                    # the 48 matrices of GPT-2 124M
    python bench/optimizer_step.py --shapes small     # GPT-2 shapes / 4, 2 layers: seconds
    python bench/optimizer_step.py --shapes 1b --device cuda   # width 2048, 24 layers
    python bench/optimizer_step.py --base e4ce816     # also normuon.py as it was at a commit

Variants: our normuon (with the default Newton-Schulz and with its Gram form,
orthogonalizer="gram_newton_schulz") and muon, eager and compiled (torch.compile(opt.step)),
torch.optim.Muon, torch.optim.AdamW, with --base REV normuon.py at git revision REV (to check
that a change costs no time), and "limit": normuon.polynomial_iterations alone on the same
matrices (bf16, batched by shape, written into preallocated outputs: the matmuls and the r x r
work that normalizes X inside them; no momentum, casts, update or allocation), i.e. the
matmul time no step of the plain iteration can go below (the Gram form does fewer FLOPs).

Method (so that noise and order cannot decide the result): every variant owns its optimizer
state over the same parameters and gradients; all are warmed up the same number of steps
(compiled ones compile there); then each round times one step of every variant, in an order
that rotates from round to round. Reported: median and min-max per variant over the rounds,
and ratios of medians. Peak extra memory of a step (bytes above what was allocated before it,
per parameter element) comes from a separate, untimed step: the CUDA allocator's peak on
CUDA; on CPU, torch's dispatch-level tracker (MemTracker), which cannot see inside compiled
code, so compiled variants have none there. Default allocator settings.
"""
import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normuon import (NEWTON_SCHULZ_COEFFICIENTS, NorMuon, newton_schulz_flops,  # noqa: E402
                     polynomial_iterations)
from train_gpt import hidden_matrix_shapes, synchronize  # noqa: E402

SHAPES = {"gpt2": ("GPT-2 124M", hidden_matrix_shapes(12, 768)),
          "small": ("GPT-2 / 4, 2 layers", hidden_matrix_shapes(2, 192)),
          "1b": ("width 2048, 24 layers (1B class)", hidden_matrix_shapes(24, 2048))}


class MatmulLimit:
    """Newton-Schulz's matmuls alone (normuon.polynomial_iterations) on the workload's shapes,
    batched as NorMuon batches them, as a steppable 'optimizer'."""

    def __init__(self, shapes, device, steps: int = 5):
        self.coefficients = [NEWTON_SCHULZ_COEFFICIENTS] * steps
        self.batches = []
        for (m, n), count in sorted({s: shapes.count(s) for s in shapes}.items()):
            X = torch.randn(count, m, n, device=device, dtype=torch.bfloat16) / max(m, n) ** 0.5
            A = X.new_empty(count, min(m, n), min(m, n))
            self.batches.append((X, (A, torch.empty_like(A), torch.empty_like(X))))

    def step(self) -> None:
        for X, buffers in self.batches:
            polynomial_iterations(X, self.coefficients, 1.0, buffers)


def normuon_at(revision: str):
    """normuon.py as it was at git `revision`, as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:normuon.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_loader(f"normuon_at_{revision}", loader=None))
    exec(compile(source, f"normuon.py at {revision}", "exec"), module.__dict__)
    return module


def variants(compile: bool, base: str | None = None) -> dict:
    """name -> (make optimizer from params, compile its step?). Eager ones first in the warm-up:
    once something has compiled, Inductor's workers can keep a small machine busy a while."""
    table = {"normuon (ours)": (lambda ps: NorMuon(ps, lr=1e-3), False),
             "normuon (ours, gram)": (lambda ps: NorMuon(ps, lr=1e-3,
                                                         orthogonalizer="gram_newton_schulz"),
                                      False)}
    if base:
        table[f"normuon at {base}"] = (lambda ps: normuon_at(base).NorMuon(ps, lr=1e-3), False)
    table |= {
        "muon (ours)": (lambda ps: NorMuon(ps, lr=1e-3, algorithm="muon",
                                           adjust_lr="original"), False),
        "torch.optim.Muon": (lambda ps: torch.optim.Muon(ps, lr=1e-3), False),
        "torch.optim.AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), False),
    }
    if compile:
        table["normuon (ours, compiled)"] = (lambda ps: NorMuon(ps, lr=1e-3), True)
        table["normuon (gram, compiled)"] = (lambda ps: NorMuon(
            ps, lr=1e-3, orthogonalizer="gram_newton_schulz"), True)
        table["muon (ours, compiled)"] = (lambda ps: NorMuon(
            ps, lr=1e-3, algorithm="muon", adjust_lr="original"), True)
    return table


class NewMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive at once. In-place
    results and views of storages that existed before are not new; a storage counts until it
    is freed."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in inputs or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def peak_extra_bytes(step, device: torch.device, can_track: bool) -> int | None:
    """Bytes allocated at the peak of one step above what was allocated before it."""
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not can_track:
        return None
    with NewMemory() as tracker:
        step()
    return tracker.peak


def profile_table(step, device: torch.device, rows: int = 25) -> str:
    """The torch profiler's table of one step's most expensive kernels (or CPU ops)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def measure(shapes, device, rounds: int, warmup: int, compile: bool,
            profile: list[str] = (), base: str | None = None) -> dict:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(m, n, device=device) / n ** 0.5) for m, n in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    steps = {"limit": MatmulLimit(shapes, device).step}
    compiled = set()
    for name, (make, compiled_step) in variants(compile, base).items():
        opt = make(params)
        steps[name] = torch.compile(opt.step) if compiled_step else opt.step
        if compiled_step:
            compiled.add(name)
    for name, step in steps.items():   # state created and code compiled: off the clock
        for _ in range(warmup):
            step()
    memory = {name: peak_extra_bytes(step, device, name not in compiled)
              for name, step in steps.items()}
    times = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    for name in profile:
        print(f"\n-- profile of one step: {name}\n{profile_table(steps[name], device)}")
    return {"times_s": times, "peak_extra_bytes": memory}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", choices=SHAPES, default="gpt2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip compiled variants")
    parser.add_argument("--base", metavar="REV",
                        help="also time normuon.py as it was at this git revision")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", nargs="+", default=[], metavar="VARIANT",
                        help="also print the profiler's table of one step of these variants")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    label, shapes = SHAPES[args.shapes]
    elements = sum(m * n for m, n in shapes)
    flops = sum(newton_schulz_flops(m, n) for m, n in shapes)

    result = measure(shapes, device, args.rounds, args.warmup, not args.no_compile,
                     args.profile, args.base)
    median = {name: statistics.median(t) for name, t in result["times_s"].items()}
    limit, peer = median["limit"], median["torch.optim.Muon"]
    print(f"{len(shapes)} matrices ({label}), {elements / 1e6:.1f}M elements on {device}; "
          f"torch {torch.__version__}; {args.rounds} rounds after {args.warmup} warm-up steps")
    print(f"Newton-Schulz {flops / 1e9:.1f} GFLOP per step; limit {limit * 1e3:.2f} ms = "
          f"{flops / limit / 1e12:.2f} TFLOP/s\n")
    print(f"{'variant':<26}{'median ms':>10}{'min-max ms':>18}{'x limit':>9}{'x torch Muon':>13}"
          f"{'peak B/elem':>12}")
    for name, t in result["times_s"].items():
        peak = result["peak_extra_bytes"][name]
        peak_text = f"{peak / elements:.2f}" if peak is not None else "-"
        spread = f"{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}"
        print(f"{name:<26}{median[name] * 1e3:>10.2f}{spread:>18}{median[name] / limit:>9.2f}"
              f"{median[name] / peer:>13.2f}{peak_text:>12}")
    if args.base:
        ratio = median["normuon (ours)"] / median[f"normuon at {args.base}"]
        print(f"\nnormuon (ours) / normuon at {args.base}: {ratio:.3f} (ratio of medians)")
    summary = {"device": str(device), "torch": torch.__version__, "shapes": args.shapes,
               "elements": elements, "newton_schulz_flops": flops, "rounds": args.rounds,
               "warmup": args.warmup, "median_s": median, **result}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
