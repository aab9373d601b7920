"""Training efficiency of NorMuon, Muon and AdamW on train_gpt.py's tiny preset (the paper's
Table 1, at a scale 2 CPU cores can run).

    python bench/compare_optimizers.py            # about 50 minutes on 2 CPU cores
    python bench/compare_optimizers.py --quick    # a smaller model and budget: under a minute

Each optimizer (what the hidden matrices use; embeddings and head are AdamW in every run) gets
the same learning-rate sweep; the lr with the lowest final val loss wins, and it is re-run with
more seeds. Reported as in the paper: the steps each optimizer needs to reach AdamW's final
val loss (linearly interpolated between evaluations), % fewer steps than AdamW and than Muon,
the spread over seeds, and wall time per step. Writes compare_optimizers.{md,png,json} to
--out-dir; a run whose log is complete is not repeated.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402

OPTIMIZERS = ("normuon", "muon", "adamw")
FULL = dict(args=["--preset", "tiny", "--max-steps", "300", "--val-every", "20",
                  "--val-tokens", "65536"],
            lrs=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], seeds=[0, 1, 2])
QUICK = dict(args=["--n-layer", "1", "--dim", "32", "--n-head", "2", "--seq-len", "32",
                   "--micro-batch", "8", "--tokens-per-step", "256", "--val-tokens", "4096",
                   "--max-steps", "30", "--val-every", "5"],
             lrs=[4e-3, 1.6e-2], seeds=[0, 1])


def run(out_dir: Path, budget: dict, optimizer: str, lr: float, seed: int,
        data_dir: Path | None) -> dict:
    """One training run (or its log, if it finished before): evaluations and summary."""
    run_dir = out_dir / "runs" / f"{optimizer}_lr{lr:g}_seed{seed}"
    log = run_dir / "log.jsonl"
    if not (log.exists() and '"kind": "summary"' in log.read_text()):
        log.unlink(missing_ok=True)
        argv = [*budget["args"], "--optimizer", optimizer, "--lr", str(lr), "--seed", str(seed),
                "--device", "cpu", "--no-compile", "--out-dir", str(run_dir)]
        train_gpt.main(argv + (["--data-dir", str(data_dir)] if data_dir else []))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]
    summary = records[-1]
    return {"optimizer": optimizer, "lr": lr, "seed": seed, "evals": evals,
            "final": evals[-1][1], "seconds_per_step": summary["train_time_s"] / summary["steps"]}


def steps_to_reach(evals: list[tuple[int, float]], target: float) -> float | None:
    """First step at which val loss reaches target, interpolated between evaluations."""
    for (s0, l0), (s1, l1) in zip(evals, evals[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else s0
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(best_runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for color, (optimizer, runs) in zip(("C0", "C1", "C2"), best_runs.items()):
        for i, r in enumerate(runs):
            steps = [s for s, _ in r["evals"][1:]]
            losses = [v for _, v in r["evals"][1:]]
            label = f"{optimizer} (lr {r['lr']:g})" if i == 0 else None
            by_step.plot(steps, losses, color=color, alpha=0.8, label=label)
            by_time.plot([s * r["seconds_per_step"] for s in steps], losses, color=color,
                         alpha=0.8, label=label)
    by_step.set(xlabel="step", ylabel="val loss", title="val loss against steps")
    by_time.set(xlabel="training time (s, evaluation excluded)", title="against wall time")
    by_step.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--data-dir", type=Path, help="shards (default: the stdlib corpus)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    args.out_dir.mkdir(parents=True, exist_ok=True)

    sweep = {opt: [run(args.out_dir, budget, opt, lr, budget["seeds"][0], args.data_dir)
                   for lr in budget["lrs"]] for opt in OPTIMIZERS}
    best_lr = {opt: min(runs, key=lambda r: r["final"])["lr"] for opt, runs in sweep.items()}
    best_runs = {opt: [run(args.out_dir, budget, opt, best_lr[opt], seed, args.data_dir)
                       for seed in budget["seeds"]] for opt in OPTIMIZERS}

    max_steps = int(budget["args"][budget["args"].index("--max-steps") + 1])
    target = statistics.mean(r["final"] for r in best_runs["adamw"])
    steps = {opt: [steps_to_reach(r["evals"], target) for r in runs]
             for opt, runs in best_runs.items() if opt != "adamw"}
    # as in the paper: the baseline reaches its final loss where its run ends, by definition
    steps["adamw"] = [float(max_steps)] * len(best_runs["adamw"])
    mean_steps = {opt: (statistics.mean(s) if None not in s else None)
                  for opt, s in steps.items()}

    def fewer(opt: str, than: str) -> str:
        if opt == than or mean_steps[opt] is None or mean_steps[than] is None:
            return "-"
        return f"{100 * (1 - mean_steps[opt] / mean_steps[than]):.1f}%"

    lines = [f"AdamW's final val loss (mean of {len(budget['seeds'])} seeds): {target:.4f}; "
             f"{max_steps} steps per run\n",
             "| optimizer | best lr | final val loss | steps to AdamW's final | fewer steps than "
             "AdamW | than Muon | ms / step |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for opt in OPTIMIZERS:
        final_mean, final_std = mean_std([r["final"] for r in best_runs[opt]])
        reached = [s for s in steps[opt] if s is not None]
        steps_text = (f"{mean_std(reached)[0]:.0f} ± {mean_std(reached)[1]:.0f}"
                      if len(reached) == len(steps[opt]) else
                      f"not reached in {len(steps[opt]) - len(reached)} of {len(steps[opt])}")
        ms = 1e3 * statistics.mean(r["seconds_per_step"] for r in best_runs[opt])
        lines.append(f"| {opt} | {best_lr[opt]:g} | {final_mean:.4f} ± {final_std:.4f} | "
                     f"{steps_text} | {fewer(opt, 'adamw')} | {fewer(opt, 'muon')} | {ms:.0f} |")
    lines += ["", "Learning-rate sweep (seed 0), final val loss:", "",
              "| lr | " + " | ".join(OPTIMIZERS) + " |", "| ---: |" + " ---: |" * len(OPTIMIZERS)]
    for i, lr in enumerate(budget["lrs"]):
        lines.append(f"| {lr:g} | " + " | ".join(f"{sweep[o][i]['final']:.4f}"
                                                 for o in OPTIMIZERS) + " |")
    table = "\n".join(lines) + "\n"
    (args.out_dir / "compare_optimizers.md").write_text(table)
    (args.out_dir / "compare_optimizers.json").write_text(json.dumps(
        {"target": target, "best_lr": best_lr, "steps_to_target": steps,
         "sweep": sweep, "best_runs": best_runs}, indent=1))
    plot(best_runs, args.out_dir / "compare_optimizers.png")
    print(table)
    return {"target": target, "best_lr": best_lr, "steps_to_target": steps}


if __name__ == "__main__":
    main()
