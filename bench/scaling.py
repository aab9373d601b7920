"""How NorMuon's margin over AdamW and Muon moves with model size: compare_optimizers.py at
four sizes, one table and one plot.

    python bench/scaling.py --device cuda --jobs 4             # all four sizes on a GPU
    python bench/scaling.py --sizes tiny small --device cpu    # a subset
    python bench/scaling.py --quick                            # two quick sizes: a minute

Each size runs compare_optimizers.py's protocol (lr swept on seed 0, reported on held-out
seeds) into <out-dir>/<size>/, with the sweep and seeds of SCHEDULE below: fewer report seeds
at the largest size, where each run costs most. Finished runs are kept, so a run cut short
resumes. Writes scaling.{md,json,png} to --out-dir.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare_optimizers  # noqa: E402
import train_gpt  # noqa: E402

# (lr sweep, held-out seeds) per size: the best lr falls with size, and the larger sizes get
# fewer lrs and seeds so that the four fit a 10-minute call on one GPU
SCHEDULE = {"tiny": ([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], [1, 2, 3]),
            "small": ([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], [1, 2, 3]),
            "medium": ([1e-3, 2e-3, 4e-3, 8e-3], [1, 2]),
            "large": ([5e-4, 1e-3, 2e-3, 4e-3], [1, 2])}
PAPER = {"normuon_vs_adamw": 21.74, "normuon_vs_muon": 11.31}   # % fewer steps, 1.1B


def parameter_count(model_args: list[str]) -> int:
    """Parameters of the GPT that these train_gpt.py arguments build (on the meta device)."""
    args = train_gpt.parse_args(model_args)
    with torch.device("meta"):
        model = train_gpt.GPT(train_gpt.resolve_config(args, torch.device("cpu")))
    return sum(p.numel() for p in model.parameters())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for key, color, label in (("normuon_vs_adamw", "C0", "NorMuon vs AdamW"),
                              ("normuon_vs_muon", "C1", "NorMuon vs Muon")):
        points = [(r["parameters"], r["margins"][key]) for r in rows if key in r["margins"]]
        x = [p for p, _ in points]
        mean = [m["mean"] for _, m in points]
        low = [m["mean"] - m["ci95"][0] for _, m in points]
        high = [m["ci95"][1] - m["mean"] for _, m in points]
        axis.errorbar(x, mean, yerr=[low, high], color=color, marker="o", capsize=4,
                      label=f"{label} (95% interval over held-out seeds)")
        axis.axhline(PAPER[key], color=color, linestyle=":", label=f"{label}, paper at 1.1B")
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set(xscale="log", xlabel="parameters", ylabel="% fewer steps to AdamW's final loss")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=SCHEDULE, default=list(SCHEDULE))
    parser.add_argument("--quick", action="store_true", help="compare_optimizers --quick twice")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "scaling")
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for size in (["tiny", "small"] if args.quick else args.sizes):
        lrs, seeds = SCHEDULE[size]
        common = ["--device", args.device, "--jobs", str(args.jobs),
                  "--out-dir", str(args.out_dir / size)]
        common += ["--data-dir", str(args.data_dir)] if args.data_dir else []
        if args.quick:
            common += ["--quick"]
        else:
            common += ["--size", size, "--lrs", *map(str, lrs),
                       "--report-seeds", *map(str, seeds)]
        print(f"== {size}", flush=True)
        result = compare_optimizers.main(common)
        rows.append({"size": size, "parameters": parameter_count(result["model_args"]),
                     "best_lr": result["best_lr"], "target": result["target"],
                     "report_seeds": result["report_seeds"], "margins": result["margins"],
                     "steps": {o: result["optimizers"][o]["steps_to_target"]
                               for o in compare_optimizers.OPTIMIZERS}})

    lines = [f"Device {args.device}; each size: lr swept on seed 0, reported on the held-out "
             "seeds shown; % fewer steps to AdamW's final val loss, paired by seed, mean "
             "[95% interval].", "",
             "| size | parameters | best lr (NorMuon / Muon / AdamW) | held-out seeds | "
             "NorMuon vs AdamW | NorMuon vs Muon | Muon vs AdamW |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: |"]

    def cell(margins: dict, key: str) -> str:
        m = margins.get(key)
        return f"{m['mean']:.1f} [{m['ci95'][0]:.1f}, {m['ci95'][1]:.1f}]" if m else "not reached"
    for r in rows:
        lr = " / ".join(f"{r['best_lr'][o]:g}" for o in compare_optimizers.OPTIMIZERS)
        lines.append(f"| {r['size']} | {r['parameters'] / 1e6:.2f}M | {lr} | "
                     f"{', '.join(map(str, r['report_seeds']))} | "
                     f"{cell(r['margins'], 'normuon_vs_adamw')} | "
                     f"{cell(r['margins'], 'normuon_vs_muon')} | "
                     f"{cell(r['margins'], 'muon_vs_adamw')} |")
    lines.append(f"| paper (1.1B) | 1100M | | | {PAPER['normuon_vs_adamw']} | "
                 f"{PAPER['normuon_vs_muon']} | |")
    table = "\n".join(lines) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scaling.md").write_text(table)
    (args.out_dir / "scaling.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out_dir / "scaling.png")
    print(table)
    return rows


if __name__ == "__main__":
    main()
