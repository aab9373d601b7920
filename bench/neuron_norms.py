"""The neuron-norm imbalance (the paper's Figure 1) on the tiny model's MLP matrix.

    python bench/neuron_norms.py                    # trains tiny to step 300 of 600 first
    python bench/neuron_norms.py --checkpoint out/checkpoint_000300.pt
    python bench/neuron_norms.py --quick            # a small model, seconds

From a mid-training checkpoint, the gradients of one MLP input matrix over --steps batches are
fed to four update rules from a fresh state: raw momentum, AdamW, Muon and NorMuon. The
last update of each is compared: its per-neuron (row) norms, and its singular values. Writes
neuron_norms.png (two panels), neuron_norms.md and neuron_norms.json to --out-dir.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402
from normuon import (adamw_update, nesterov_direction, neuron_step,  # noqa: E402
                     orthogonalize)

QUICK = ["--n-layer", "2", "--dim", "64", "--n-head", "2", "--seq-len", "64",
         "--micro-batch", "8", "--tokens-per-step", "512", "--val-tokens", "4096",
         "--max-steps", "40", "--val-every", "40", "--lr", "1e-2"]


def mid_training_checkpoint(args) -> Path:
    if args.checkpoint:
        return args.checkpoint
    run_dir = args.out_dir / "neuron_norms_run"
    common = ["--device", "cpu", "--no-compile", "--out-dir", str(run_dir)]
    if args.data_dir:
        common += ["--data-dir", str(args.data_dir)]
    if args.quick:
        train_gpt.main([*QUICK, *common, "--stop-at-step", "20"])
    else:
        train_gpt.main(["--preset", "tiny", *common, "--stop-at-step", "300"])
    return train_gpt.find_checkpoint(run_dir)


def matrix_gradients(checkpoint: Path, steps: int, data_dir: Path | None):
    """The chosen matrix's gradients over the next `steps` batches, the model held fixed."""
    model, cfg, run = train_gpt.model_from_checkpoint(checkpoint)
    train_files, _ = train_gpt.find_shards(data_dir or train_gpt.default_data_dir())
    stream = train_gpt.TokenStream(train_files, cfg.micro_batch, cfg.seq_len, 0, 1,
                                   cfg.vocab_size)
    stream.load_state(run.stream)
    layer = cfg.n_layer // 2
    weight = model.blocks[layer].mlp.fc.weight                  # (4D, D): a tall matrix
    grads = []
    for _ in range(steps):
        model.zero_grad()
        x, y = stream.next_batch(torch.device("cpu"))
        model(x, y).backward()
        grads.append(weight.grad.detach().clone())
    return f"blocks.{layer}.mlp.fc.weight {tuple(weight.shape)} at step {run.step}", grads


def final_updates(grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The last update direction of each rule after all the gradients, from a fresh state
    (normuon.py's functions; lr = 1, no weight decay)."""
    shape = grads[0].shape
    buffer, second_moment = torch.zeros(shape), torch.zeros(shape[0])
    exp_avg, exp_avg_sq, adamw_param = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for step, G in enumerate(grads, start=1):
        U = nesterov_direction(buffer, G, 0.95, True)              # raw (Nesterov) momentum
        O = orthogonalize(U)                                        # Muon
        row_scale, _ = neuron_step(O, second_moment, algorithm="normuon", beta2=0.95, eps=1e-8)
        O_hat = O * row_scale[:, None]                             # NorMuon
        before = adamw_param.clone()
        adamw_update(adamw_param, G, exp_avg, exp_avg_sq, step, lr=1.0, betas=(0.9, 0.95),
                     eps=1e-8, weight_decay=0.0)
    return {"raw momentum": U, "AdamW": before - adamw_param, "Muon": O, "NorMuon": O_hat}


def describe(update: torch.Tensor) -> dict:
    rows = update.norm(dim=1)
    singular = torch.linalg.svdvals(update.double())
    return {"row_norm_cv": (rows.std() / rows.mean()).item(),
            "row_norm_max_over_min": (rows.max() / rows.min()).item(),
            "condition_number": (singular[0] / singular[-1]).item(),
            "rows": (rows / rows.mean()).sort(descending=True).values.tolist(),
            "singular": (singular / singular[0]).tolist()}


def plot(stats: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in stats.items():
        left.plot(s["rows"], label=f"{name} (CV {s['row_norm_cv']:.2f})")
        right.plot(s["singular"], label=f"{name} (cond {s['condition_number']:.3g})")
    left.set(yscale="log", xlabel="neuron (sorted)", ylabel="row norm / mean",
             title="per-neuron update norms")
    right.set(yscale="log", xlabel="index", ylabel="singular value / largest",
              title="singular values of the update")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a train_gpt.py checkpoint")
    parser.add_argument("--data-dir", type=Path, help="shards (default: the stdlib corpus)")
    parser.add_argument("--steps", type=int, default=30, help="gradients fed to each rule")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    checkpoint = mid_training_checkpoint(args)
    where, grads = matrix_gradients(checkpoint, 5 if args.quick else args.steps, args.data_dir)
    stats = {name: describe(u) for name, u in final_updates(grads).items()}
    title = f"{where}, last of {len(grads)} updates from a fresh optimizer state"
    plot(stats, title, args.out_dir / "neuron_norms.png")

    lines = [f"{title}\n", "| update | row-norm CV | row-norm max/min | condition number |",
             "| --- | ---: | ---: | ---: |"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['row_norm_cv']:.3f} | {s['row_norm_max_over_min']:.2f} "
                     f"| {s['condition_number']:.3g} |")
    table = "\n".join(lines) + "\n"
    (args.out_dir / "neuron_norms.md").write_text(table)
    (args.out_dir / "neuron_norms.json").write_text(json.dumps(
        {"where": where, "stats": {n: {k: v for k, v in s.items() if k not in ("rows", "singular")}
                                   for n, s in stats.items()}}, indent=1))
    print(table)
    return stats


if __name__ == "__main__":
    main()
