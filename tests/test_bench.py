"""Smoke tests of the bench/ scripts' small paths: they run and print the rows they should.
No timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_distributed_step_bench_prints_a_row_per_layout():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distributed_step.py"), "--layouts", "1", "2",
         "2x2", "--layers", "1", "--scale", "8", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=300, check=True)
    rows = [line.split() for line in result.stdout.splitlines()]
    table = {row[0]: row for row in rows if row and row[0] in ("1", "2", "2x2")}
    assert set(table) == {"1", "2", "2x2"}
    for layout in ("2", "2x2"):   # HSDP 2x2 exchanges rows within a replica group of 2
        sent, analytic = float(table[layout][5]), float(table[layout][6])
        assert table[layout][4].endswith("x")            # sharded / single-device ratio
        assert abs(sent - analytic) <= 0.05 * analytic   # the 2 + 2 bytes per element
    assert "W=8" in result.stdout and "whole mesh" in result.stdout


def test_optimizer_step_small_steps_every_variant_in_every_round(tmp_path):
    import optimizer_step
    # --base adds the optimizer of a git revision as one more variant of every round
    summary = optimizer_step.main(["--shapes", "small", "--no-compile", "--rounds", "2",
                                   "--warmup", "1", "--base", "HEAD",
                                   "--json", str(tmp_path / "steps.json")])
    names = {"limit", "normuon (ours)", "normuon (ours, gram)", "muon (ours)",
             "torch.optim.Muon", "torch.optim.AdamW", "normuon at HEAD"}
    assert set(summary["times_s"]) == names
    assert all(len(times) == 2 for times in summary["times_s"].values())
    assert json.loads((tmp_path / "steps.json").read_text())["median_s"].keys() == names


def test_orthogonalizers_bench_times_every_form_on_every_aspect_ratio(tmp_path, capsys):
    import orthogonalizers
    summary = orthogonalizers.main(["--width", "16", "--rounds", "2",
                                    "--json", str(tmp_path / "forms.json")])
    assert [row["aspect"] for row in summary["rows"]] == list(orthogonalizers.ASPECTS)
    assert len(summary["median_s"]) == 3 * len(orthogonalizers.ASPECTS)
    assert json.loads((tmp_path / "forms.json").read_text())["rows"] == summary["rows"]
    printed = capsys.readouterr().out
    assert all(f"{m}x{n}" in printed for m, n in (row["shape"] for row in summary["rows"]))
    assert orthogonalizers.main(["--width", "16", "--rounds", "1", "--no-bf16"])[
        "rows"][0]["gram_over_bf16"] is None


def test_the_limit_does_exactly_the_newton_schulz_flops_of_the_workload():
    """FLOPs counted by torch's FlopCounterMode, against the analytic count per matrix."""
    from torch.utils.flop_counter import FlopCounterMode

    import optimizer_step
    from normuon import newton_schulz_flops
    shapes = optimizer_step.SHAPES["small"][1]
    limit = optimizer_step.MatmulLimit(shapes, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        limit.step()
    assert counter.get_total_flops() == sum(newton_schulz_flops(m, n) for m, n in shapes)


def test_normuon_step_memory_is_bounded_by_one_large_matrix_not_the_bucket():
    """Peak extra memory of a step: within 10% of torch.optim.Muon's (which steps one matrix
    at a time), checked against an independent count of a known allocation pattern first."""
    from torch import nn

    import optimizer_step
    from normuon import NorMuon

    x = torch.randn(1000)                            # 4000 bytes
    with optimizer_step.NewMemory() as tracker:
        a = x * 2                                    # +4000
        b = a + 1                                    # +4000: peak 8000
        del a
        c = b.bfloat16()                             # +2000 after a's 4000 were freed
        c.add_(1)                                    # in place: nothing new
    assert tracker.peak == 8000 and tracker.current == 6000
    del b, c

    shapes = optimizer_step.hidden_matrix_shapes(4, 192)        # 4 same-shape per bucket
    peaks = {}
    for name, make in [("normuon", lambda ps: NorMuon(ps)),
                       ("torch", lambda ps: torch.optim.Muon(ps))]:
        params = [nn.Parameter(torch.randn(m, n)) for m, n in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        opt.step()                                   # state exists from here on
        peaks[name] = optimizer_step.peak_extra_bytes(opt.step, torch.device("cpu"), True)
    assert peaks["normuon"] <= 1.1 * peaks["torch"]


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


def test_compare_optimizers_quick_reports_on_seeds_the_lr_choice_never_saw(tmp_path, corpus):
    import compare_optimizers
    # two runs at a time, one thread each: these tiny models gain nothing from a second thread
    result = compare_optimizers.main(["--quick", "--jobs", "2", "--out-dir", str(tmp_path),
                                      "--data-dir", str(corpus)])
    quick = compare_optimizers.QUICK
    assert not set(result["report_seeds"]) & set(result["selection_seeds"])
    table = (tmp_path / "compare_optimizers.md").read_text()
    saved = json.loads((tmp_path / "compare_optimizers.json").read_text())
    for optimizer in ("normuon", "muon", "adamw"):
        assert f"| {optimizer} |" in table
        assert result["best_lr"][optimizer] in quick["lrs"]
        # the lr is the sweep's best on the selection seed
        sweep = saved["sweep"][optimizer]
        assert min(sweep, key=sweep.get) == str(result["best_lr"][optimizer])
        # every reported number comes from the held-out seeds' own logs
        runs = saved["report_runs"][optimizer]
        assert sorted(map(int, runs)) == quick["report_seeds"]
        finals = [runs[str(s)]["final"] for s in quick["report_seeds"]]
        assert result["optimizers"][optimizer]["final_val_loss"]["values"] == finals
    target = sum(saved["report_runs"]["adamw"][str(s)]["final"]
                 for s in quick["report_seeds"]) / len(quick["report_seeds"])
    assert abs(result["target"] - target) < 1e-12
    assert (tmp_path / "compare_optimizers.png").stat().st_size > 10_000
    # a second call reads the finished runs back instead of training again
    assert compare_optimizers.main(["--quick", "--out-dir", str(tmp_path), "--data-dir",
                                    str(corpus)])["target"] == result["target"]


def test_compare_optimizers_refuses_a_seed_in_both_roles(tmp_path):
    import compare_optimizers
    with pytest.raises(SystemExit):
        compare_optimizers.main(["--quick", "--out-dir", str(tmp_path),
                                 "--selection-seeds", "0", "--report-seeds", "0", "1"])


def test_describe_gives_students_t_interval_and_paired_margins():
    import compare_optimizers
    d = compare_optimizers.describe([1.0, 3.0])          # mean 2, std sqrt(2), n = 2
    assert d["mean"] == 2.0 and abs(d["std"] - 2 ** 0.5) < 1e-12
    assert abs(d["ci95"][1] - (2.0 + 12.706)) < 1e-9     # t(0.975, 1 dof) * std / sqrt(2)
    run = lambda final, evals: {"final": final, "evals": evals, "seconds_per_step": 0.1}
    report = {"adamw": {1: run(2.0, [(0, 5), (100, 2.0)]), 2: run(2.0, [(0, 5), (100, 2.0)])},
              "muon": {1: run(1.5, [(0, 5), (50, 2.0), (100, 1.5)]),
                       2: run(1.5, [(0, 5), (80, 2.0), (100, 1.5)])},
              "normuon": {1: run(1.4, [(0, 5), (40, 2.0), (100, 1.4)]),
                          2: run(1.4, [(0, 5), (40, 2.0), (100, 1.4)])}}
    budget = {"report_seeds": [1, 2]}
    summary = compare_optimizers.summarize({}, report, budget, max_steps=100)
    margin = summary["margins"]["normuon_vs_muon"]
    assert margin["values"] == [100 * (1 - 40 / 50), 100 * (1 - 40 / 80)]   # paired by seed
    assert summary["optimizers"]["adamw"]["steps_to_target"]["mean"] == 100


def test_steps_to_reach_interpolates_between_evaluations():
    import compare_optimizers
    evals = [(0, 5.0), (10, 3.0), (20, 2.0), (30, 1.5)]
    assert compare_optimizers.steps_to_reach(evals, 2.5) == 15.0
    assert compare_optimizers.steps_to_reach(evals, 2.0) == 20.0
    assert compare_optimizers.steps_to_reach(evals, 1.0) is None


def test_scaling_quick_combines_each_sizes_own_results(tmp_path, corpus):
    import scaling
    rows = scaling.main(["--quick", "--jobs", "2", "--device", "cpu", "--out-dir", str(tmp_path),
                         "--data-dir", str(corpus)])
    assert [r["size"] for r in rows] == ["tiny", "small"]
    table = (tmp_path / "scaling.md").read_text()
    for row in rows:
        # the margins in the combined table are those of the size's own compare_optimizers run
        own = json.loads((tmp_path / row["size"] / "compare_optimizers.json").read_text())
        assert row["margins"] == own["margins"] and row["best_lr"] == own["best_lr"]
        mean = own["margins"]["normuon_vs_muon"]["mean"]
        assert f"| {row['size']} |" in table and f"{mean:.1f} [" in table
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_synthetic_shards_are_valid_gpt2_vocabulary_shards(tmp_path):
    import synthetic_shards
    from train_gpt import find_shards, read_shard, read_shard_header
    synthetic_shards.main([str(tmp_path), "--train-tokens", "30000", "--val-tokens", "5000",
                           "--shard-tokens", "20000"])
    train, val = find_shards(tmp_path)
    assert [read_shard_header(p) for p in train] == [20000, 10000]
    assert [read_shard_header(p) for p in val] == [5000]
    tokens = read_shard(train[0]).to(torch.int64)
    assert tokens.max() < synthetic_shards.GPT2_VOCAB
    counts = torch.bincount(tokens, minlength=10)
    assert counts[0] > counts[1] > counts[9]           # Zipf: the first ids are the commonest
