"""Training efficiency of NorMuon, Muon and AdamW on train_gpt.py's GPT (the paper's Table 1, at
a scale that small machines can run), with the learning rate chosen on seeds it is not
reported on.

    python bench/compare_optimizers.py            # tiny model: about an hour on 2 CPU cores
    python bench/compare_optimizers.py --quick    # a smaller model and budget: under a minute
    python bench/compare_optimizers.py --size large --device cuda --jobs 4
    python bench/compare_optimizers.py --ablation cautious_wd qk_heads --lrs 8e-3
    python bench/compare_optimizers.py --ablation gram_ns --lrs 8e-3

Protocol. Each optimizer (what the hidden matrices use; embeddings and head are AdamW in every
run) gets the same learning-rate sweep on the *selection* seeds; the lr with the lowest mean
final val loss there wins. It is then run on the *report* seeds, which the choice never saw:
every number in the table comes from those. Seeds set the initialization; the data order is
the same for every run, so the optimizers are compared seed by seed (paired).

Reported as in the paper: the steps each optimizer needs to reach AdamW's final val loss (the
mean over report seeds; linearly interpolated between evaluations; AdamW itself is counted at
its last step), and % fewer steps than AdamW and than Muon, per seed and as mean, standard
deviation, a 95% t-interval and min-max. A margin whose interval excludes 0 is told apart from
seed noise. Runs are ordered optimizer by optimizer within each (lr, seed), so a machine that
slows down over the hour slows all three alike; ms/step is the median of the runs (min-max).

--ablation compares NorMuon against NorMuon with one option changed (ABLATIONS: cautious
weight decay, q and k orthogonalized per head, the Gram form of Newton-Schulz), each arm's
lr chosen the same way (a single --lrs value skips the choice: every arm runs at it), by the
paired difference of final val loss on the report seeds, with its 95% t-interval; writes
ablation.{md,json}.

Writes compare_optimizers.{md,png,json} to --out-dir. Finished runs are kept under
<out-dir>/runs and not repeated, so an interrupted benchmark resumes where it stopped.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normuon import t_interval  # noqa: E402

OPTIMIZERS = ("normuon", "muon", "adamw")
# train_gpt.py's flags of each --ablation arm; an arm runs as "normuon+<name>"
ABLATIONS = {"cautious_wd": ["--cautious-wd"], "qk_heads": ["--split-qkv", "heads"],
             "gram_ns": ["--orthogonalizer", "gram_newton_schulz"]}
STEPS = ["--max-steps", "300", "--val-every", "20", "--val-tokens", "65536"]
# model sizes: the tiny preset (0.85M parameters) up to the GPT-2 124M body (85M, byte-level)
SIZES = {
    "tiny": ["--preset", "tiny"],
    "small": ["--preset", "tiny", "--n-layer", "6", "--dim", "256", "--n-head", "4"],
    "medium": ["--preset", "tiny", "--n-layer", "8", "--dim", "512", "--n-head", "8"],
    "large": ["--preset", "tiny", "--n-layer", "12", "--dim", "768", "--n-head", "12"],
}
FULL = dict(lrs=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], selection_seeds=[0],
            report_seeds=[1, 2, 3, 4, 5])
QUICK = dict(args=["--n-layer", "1", "--dim", "32", "--n-head", "2", "--seq-len", "32",
                   "--micro-batch", "8", "--tokens-per-step", "256", "--val-tokens", "4096",
                   "--max-steps", "30", "--val-every", "5"],
             lrs=[4e-3, 1.6e-2], selection_seeds=[0], report_seeds=[1, 2])


# ----------------------------------------------------------------------------- runs

def run_dir(out_dir: Path, optimizer: str, lr: float, seed: int) -> Path:
    return out_dir / "runs" / f"{optimizer}_lr{lr:g}_seed{seed}"


def read_run(directory: Path) -> dict | None:
    """A finished run's evaluations and summary, or None if it has not finished."""
    log = directory / "log.jsonl"
    if not log.exists():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    summaries = [r for r in records if r["kind"] == "summary"]
    if not summaries:
        return None
    summary = summaries[-1]
    return {"evals": [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"],
            "final": summary["val_loss"],
            "seconds_per_step": summary["train_time_s"] / max(1, summary["steps"])}


def train(job: tuple, args, model_args: list[str], threads: int | None) -> None:
    """One training run in its own process (a crash or a leak stays there)."""
    optimizer, lr, seed = job
    directory = run_dir(args.out_dir, optimizer, lr, seed)
    (directory / "log.jsonl").unlink(missing_ok=True)
    base, _, ablation = optimizer.partition("+")
    command = [sys.executable, str(ROOT / "train_gpt.py"), *model_args,
               "--optimizer", base, *ABLATIONS.get(ablation, []), "--lr", str(lr),
               "--seed", str(seed),
               "--device", args.device, "--no-compile", "--out-dir", str(directory)]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode or read_run(directory) is None:
        raise RuntimeError(f"run {directory.name} failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")


def run_all(jobs: list[tuple], args, model_args: list[str]) -> dict:
    """Every (optimizer, lr, seed) of `jobs`, the finished ones read back, the rest trained
    (--jobs at a time). Returns {job: run}."""
    pending = [j for j in jobs if read_run(run_dir(args.out_dir, *j)) is None]
    if pending:
        print(f"{len(jobs) - len(pending)} of {len(jobs)} runs already done; training "
              f"{len(pending)}, {args.jobs} at a time", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        for done, _ in enumerate(pool.map(lambda j: train(j, args, model_args, threads),
                                          pending), 1):
            print(f"  {done}/{len(pending)} runs trained", flush=True)
    return {j: read_run(run_dir(args.out_dir, *j)) for j in jobs}


# ----------------------------------------------------------------------------- statistics

def steps_to_reach(evals: list[tuple[int, float]], target: float) -> float | None:
    """First step at which val loss reaches target, interpolated between evaluations."""
    for (s0, l0), (s1, l1) in zip(evals, evals[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else s0
    return None


def describe(values: list[float]) -> dict:
    """Mean, standard deviation, 95% t-interval of the mean, and min-max of `values`."""
    mean, low, high = t_interval(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": [low, high],
            "min": min(values), "max": max(values), "values": values}


def summarize(sweep: dict, report: dict, budget: dict, max_steps: int) -> dict:
    """The numbers of the table, from the report seeds only."""
    seeds = budget["report_seeds"]
    target = statistics.mean(report["adamw"][s]["final"] for s in seeds)
    steps = {opt: {s: steps_to_reach(report[opt][s]["evals"], target) for s in seeds}
             for opt in ("normuon", "muon")}
    steps["adamw"] = {s: float(max_steps) for s in seeds}   # the paper's convention
    result = {"target": target, "optimizers": {}, "margins": {}}
    for opt in OPTIMIZERS:
        reached = [v for v in steps[opt].values() if v is not None]
        ms = [1e3 * report[opt][s]["seconds_per_step"] for s in seeds]
        result["optimizers"][opt] = {
            "final_val_loss": describe([report[opt][s]["final"] for s in seeds]),
            "steps_to_target": describe(reached) if reached else None,
            "steps_per_seed": steps[opt], "not_reached": len(seeds) - len(reached),
            "ms_per_step": {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}}
    for opt, than in (("normuon", "adamw"), ("normuon", "muon"), ("muon", "adamw")):
        paired = [100 * (1 - steps[opt][s] / steps[than][s]) for s in seeds
                  if steps[opt][s] is not None and steps[than][s] is not None]
        if paired:
            margin = describe(paired)
            margin["distinguishable_from_noise"] = margin["ci95"][0] > 0 or margin["ci95"][1] < 0
            result["margins"][f"{opt}_vs_{than}"] = margin
    return result


# ----------------------------------------------------------------------------- report

def format_table(summary: dict, best_lr: dict, sweep: dict, budget: dict,
                 max_steps: int) -> str:
    def interval(d: dict, digits: int) -> str:
        return f"[{d['ci95'][0]:.{digits}f}, {d['ci95'][1]:.{digits}f}]"

    seeds = budget["report_seeds"]
    lines = [f"lr chosen on seed(s) {budget['selection_seeds']}; every number below is from the "
             f"held-out seeds {seeds}. Target: AdamW's final val loss, mean over those seeds, "
             f"{summary['target']:.4f}; {max_steps} steps per run.", "",
             "| optimizer | best lr | final val loss (mean ± std) | steps to target (mean ± "
             "std) | 95% interval | min-max | ms/step (median, min-max) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for opt in OPTIMIZERS:
        o = summary["optimizers"][opt]
        final, steps, ms = o["final_val_loss"], o["steps_to_target"], o["ms_per_step"]
        if steps is None or o["not_reached"]:
            steps_text = f"not reached in {o['not_reached']} of {len(seeds)} seeds"
            ci_text = range_text = "-"
        else:
            steps_text = f"{steps['mean']:.0f} ± {steps['std']:.0f}"
            ci_text, range_text = interval(steps, 0), f"{steps['min']:.0f}-{steps['max']:.0f}"
        lines.append(f"| {opt} | {best_lr[opt]:g} | {final['mean']:.4f} ± {final['std']:.4f} | "
                     f"{steps_text} | {ci_text} | {range_text} | {ms['median']:.0f} "
                     f"({ms['min']:.0f}-{ms['max']:.0f}) |")
    lines += ["", "Fewer steps to the target, paired by seed (%):", "",
              "| comparison | mean ± std | 95% interval | min-max | per seed | told apart "
              "from seed noise |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for name, m in summary["margins"].items():
        per_seed = ", ".join(f"{v:.1f}" for v in m["values"])
        lines.append(f"| {name.replace('_vs_', ' vs ')} | {m['mean']:.1f} ± {m['std']:.1f} | "
                     f"{interval(m, 1)} | {m['min']:.1f} to {m['max']:.1f} | {per_seed} | "
                     f"{'yes' if m['distinguishable_from_noise'] else 'no'} |")
    lines += ["", f"Learning-rate sweep, final val loss (mean over selection seeds "
              f"{budget['selection_seeds']}):", "",
              "| lr | " + " | ".join(OPTIMIZERS) + " |", "| ---: |" + " ---: |" * len(OPTIMIZERS)]
    for lr in budget["lrs"]:
        lines.append(f"| {lr:g} | " + " | ".join(f"{sweep[o][lr]:.4f}" for o in OPTIMIZERS) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, best_lr: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for color, (optimizer, runs) in zip(("C0", "C1", "C2"), report.items()):
        for i, r in enumerate(runs.values()):
            steps = [s for s, _ in r["evals"][1:]]
            losses = [v for _, v in r["evals"][1:]]
            label = f"{optimizer} (lr {best_lr[optimizer]:g})" if i == 0 else None
            by_step.plot(steps, losses, color=color, alpha=0.7, label=label)
            by_time.plot([s * r["seconds_per_step"] for s in steps], losses, color=color,
                         alpha=0.7, label=label)
    by_step.set(xlabel="step", ylabel="val loss", title="held-out seeds: val loss against steps")
    by_time.set(xlabel="training time (s, evaluation excluded)", title="against wall time")
    by_step.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def choose_and_report(arms: list[str], budget: dict, args, model_args: list[str]):
    """The protocol: each arm's best lr on the selection seeds (no runs when there is one lr),
    then every arm on the report seeds. Returns (sweep, best_lr, report)."""
    if len(budget["lrs"]) == 1:
        sweep, best_lr = None, {arm: budget["lrs"][0] for arm in arms}
    else:   # interleaved: the arms in turn for each (lr, seed)
        runs = run_all([(a, lr, s) for lr in budget["lrs"] for s in budget["selection_seeds"]
                        for a in arms], args, model_args)
        sweep = {a: {lr: statistics.mean(runs[(a, lr, s)]["final"]
                                         for s in budget["selection_seeds"])
                     for lr in budget["lrs"]} for a in arms}
        best_lr = {a: min(budget["lrs"], key=lambda lr: sweep[a][lr]) for a in arms}
    runs = run_all([(a, best_lr[a], s) for s in budget["report_seeds"] for a in arms],
                   args, model_args)
    report = {a: {s: runs[(a, best_lr[a], s)] for s in budget["report_seeds"]} for a in arms}
    return sweep, best_lr, report


def ablate(names: list[str], budget: dict, args, model_args: list[str]) -> dict:
    """NorMuon against NorMuon with each ablation's option: paired final val loss."""
    arms = ["normuon", *(f"normuon+{name}" for name in names)]
    sweep, best_lr, report = choose_and_report(arms, budget, args, model_args)
    seeds = budget["report_seeds"]
    final = {a: [report[a][s]["final"] for s in seeds] for a in arms}
    result = {"model_args": model_args, "device": args.device, "best_lr": best_lr,
              "selection_seeds": budget["selection_seeds"] if sweep else [],
              "report_seeds": seeds, "final_val_loss": {a: describe(final[a]) for a in arms},
              "sweep": sweep and {a: {str(lr): v for lr, v in sweep[a].items()} for a in arms},
              "differences": {}}
    choice = (f"lr of each arm chosen on seed(s) {budget['selection_seeds']} from {budget['lrs']}"
              if sweep else f"every arm at lr {budget['lrs'][0]:g} (no sweep)")
    lines = [f"{choice}; every number below is from the held-out seeds {seeds}.", "",
             "| arm | lr | final val loss (mean ± std) | minus normuon's, paired (mean) | "
             "95% interval | per seed | told apart from seed noise |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for arm in arms:
        loss = result["final_val_loss"][arm]
        row = f"| {arm} | {best_lr[arm]:g} | {loss['mean']:.4f} ± {loss['std']:.4f} |"
        if arm == "normuon":
            lines.append(row + " - | - | - | - |")
            continue
        difference = describe([a - b for a, b in zip(final[arm], final["normuon"])])
        difference["distinguishable_from_noise"] = (difference["ci95"][0] > 0
                                                    or difference["ci95"][1] < 0)
        result["differences"][arm] = difference
        lines.append(row + f" {difference['mean']:+.4f} | [{difference['ci95'][0]:+.4f}, "
                     f"{difference['ci95'][1]:+.4f}] | "
                     + ", ".join(f"{v:+.4f}" for v in difference["values"])
                     + f" | {'yes' if difference['distinguishable_from_noise'] else 'no'} |")
    table = "\n".join(lines) + "\n"
    (args.out_dir / "ablation.md").write_text(table)
    (args.out_dir / "ablation.json").write_text(json.dumps(result, indent=1))
    print(table)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-layer model, 30 steps")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size")
    parser.add_argument("--lrs", type=float, nargs="+", help="the sweep (default: 6 values)")
    parser.add_argument("--selection-seeds", type=int, nargs="+", help="default: 0")
    parser.add_argument("--report-seeds", type=int, nargs="+", help="default: 1 2 3 4 5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (each its own process; CPU threads are shared)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--data-dir", type=Path, help="shards (default: the stdlib corpus)")
    parser.add_argument("--ablation", nargs="+", choices=ABLATIONS,
                        help="NorMuon against NorMuon with these options, instead of the three "
                             "optimizers")
    args = parser.parse_args(argv)
    budget = dict(QUICK if args.quick else FULL)
    for key in ("lrs", "selection_seeds", "report_seeds"):
        budget[key] = getattr(args, key) or budget[key]
    if set(budget["selection_seeds"]) & set(budget["report_seeds"]):
        parser.error("a seed used to choose the lr cannot also be reported on: "
                     f"--selection-seeds {budget['selection_seeds']} and --report-seeds "
                     f"{budget['report_seeds']} overlap")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    model_args = budget["args"] if args.quick else [*SIZES[args.size], *STEPS]
    max_steps = int(model_args[model_args.index("--max-steps") + 1])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.data_dir is None:   # build the default corpus once, before parallel runs race for it
        import train_gpt
        args.data_dir = train_gpt.default_data_dir()
        if not (args.data_dir / "COMPLETE").exists():
            train_gpt.build_stdlib_corpus(args.data_dir)

    if args.ablation:
        return ablate(args.ablation, budget, args, model_args)
    if len(budget["lrs"]) < 2:
        parser.error("comparing optimizers needs a sweep of at least 2 --lrs")
    sweep, best_lr, report = choose_and_report(list(OPTIMIZERS), budget, args, model_args)

    summary = summarize(sweep, report, budget, max_steps)
    table = format_table(summary, best_lr, sweep, budget, max_steps)
    (args.out_dir / "compare_optimizers.md").write_text(table)
    result = {"size": "quick" if args.quick else args.size, "model_args": model_args,
              "device": args.device, "best_lr": best_lr, "selection_seeds":
              budget["selection_seeds"], "report_seeds": budget["report_seeds"],
              **summary, "sweep": {o: {str(lr): v for lr, v in sweep[o].items()}
                                   for o in OPTIMIZERS},
              "report_runs": {o: {str(s): r for s, r in report[o].items()} for o in OPTIMIZERS}}
    (args.out_dir / "compare_optimizers.json").write_text(json.dumps(result, indent=1))
    plot(report, best_lr, args.out_dir / "compare_optimizers.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
