"""The NorMuon step of this checkout's normuon.py against the one at another git revision, in
one process: the same matrices and gradients, stepped in turn round after round after the same
warm-up (CPU). For checking that a change to the update costs no time.

    python bench/versions_step.py --base e4ce816                  # GPT-2 124M's 48 matrices
    python bench/versions_step.py --base HEAD~3 --layers 4 --scale 4

Prints the median and min-max of each, and the ratio of medians (this checkout / base).
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import normuon  # noqa: E402
from train_gpt import hidden_matrix_shapes  # noqa: E402


def module_at(revision: str, folder: Path):
    """normuon.py as it was at `revision`, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:normuon.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = folder / "normuon_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("normuon_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--scale", type=int, default=1, help="divide GPT-2's dims by this")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    shapes = hidden_matrix_shapes(args.layers, 768 // args.scale)
    with tempfile.TemporaryDirectory() as folder:
        base = module_at(args.base, Path(folder))
        torch.manual_seed(0)
        initial = [torch.randn(m, n) / n ** 0.5 for m, n in shapes]
        variants = {}
        for name, module in (("base", base), ("this", normuon)):
            params = [nn.Parameter(w.clone()) for w in initial]
            variants[name] = (module.NorMuon(params), params)
        times = {name: [] for name in variants}
        for round_ in range(args.warmup + args.rounds):
            gradients = [torch.randn_like(w) for w in initial]
            for name, (opt, params) in variants.items():
                for p, g in zip(params, gradients):
                    p.grad = g.clone()
                start = time.perf_counter()
                opt.step()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    print(f"{len(shapes)} matrices, GPT-2 shapes / {args.scale}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, label in (("base", f"normuon.py at {args.base}"), ("this", "this checkout")):
        values = times[name]
        print(f"  {label:28s} {statistics.median(values) * 1e3:9.1f} ms "
              f"({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f})")
    ratio = statistics.median(times["this"]) / statistics.median(times["base"])
    print(f"  this / base: {ratio:.3f}")
    return {"times_s": times, "ratio": ratio}


if __name__ == "__main__":
    main()
