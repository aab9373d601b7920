"""Smoke tests of the bench/ scripts' small paths: they run and print the rows they should.
No timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_distributed_step_bench_prints_a_row_per_world_size():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distributed_step.py"), "--worlds", "1", "2",
         "--layers", "1", "--scale", "8", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=300, check=True)
    rows = [line.split() for line in result.stdout.splitlines()]
    table = {row[0]: row for row in rows if row and row[0] in ("1", "2")}
    assert set(table) == {"1", "2"}
    sent, analytic = float(table["2"][3]), float(table["2"][4])
    assert abs(sent - analytic) <= 0.05 * analytic       # the 2 + 2 bytes per element
    assert "W=8" in result.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from train_gpt import build_stdlib_corpus
    data_dir = tmp_path_factory.mktemp("stdlib")
    build_stdlib_corpus(data_dir, shard_tokens=2_000_000)
    return data_dir


def test_optimizer_step_small_times_every_optimizer_against_the_limit(tmp_path):
    import optimizer_step
    summary = optimizer_step.main(["--small", "--no-compile", "--repeats", "1", "--warmup", "0",
                                   "--json", str(tmp_path / "steps.json")])
    assert set(summary["median_s"]) == {"normuon (ours)", "muon (ours)", "torch.optim.Muon",
                                        "torch.optim.AdamW"}
    assert all(seconds > 0 for seconds in summary["median_s"].values())
    assert summary["limit_s"] > 0 and (tmp_path / "steps.json").exists()


def test_neuron_norms_quick_writes_figure_and_table(tmp_path, corpus):
    import neuron_norms
    stats = neuron_norms.main(["--quick", "--out-dir", str(tmp_path), "--data-dir", str(corpus)])
    assert set(stats) == {"raw momentum", "AdamW", "Muon", "NorMuon"}
    table = (tmp_path / "neuron_norms.md").read_text()
    for name in stats:
        assert f"| {name} |" in table
    assert (tmp_path / "neuron_norms.png").stat().st_size > 10_000
    # the paper's observation, on this tiny model too: Muon's rows are less even than NorMuon's
    assert stats["NorMuon"]["row_norm_cv"] < stats["Muon"]["row_norm_cv"]


def test_compare_optimizers_quick_reports_every_optimizer(tmp_path, corpus):
    import compare_optimizers
    result = compare_optimizers.main(["--quick", "--out-dir", str(tmp_path),
                                      "--data-dir", str(corpus)])
    table = (tmp_path / "compare_optimizers.md").read_text()
    for optimizer in ("normuon", "muon", "adamw"):
        assert f"| {optimizer} |" in table
        assert result["best_lr"][optimizer] in compare_optimizers.QUICK["lrs"]
    assert (tmp_path / "compare_optimizers.png").stat().st_size > 10_000
    runs = json.loads((tmp_path / "compare_optimizers.json").read_text())["best_runs"]
    assert all(len(r) == len(compare_optimizers.QUICK["seeds"]) for r in runs.values())


def test_steps_to_reach_interpolates_between_evaluations():
    import compare_optimizers
    evals = [(0, 5.0), (10, 3.0), (20, 2.0), (30, 1.5)]
    assert compare_optimizers.steps_to_reach(evals, 2.5) == 15.0
    assert compare_optimizers.steps_to_reach(evals, 2.0) == 20.0
    assert compare_optimizers.steps_to_reach(evals, 1.0) is None
