"""distributed.py on real gloo process groups (tests/distributed_worker.py under torchrun):
parity with the single-device optimizer at W = 1..4 for FSDP2 and DDP, communication volume,
owner load balance, DCP checkpoints (same and different world size), and torch.compile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import assign_owners, shard_rows
from normuon import newton_schulz_flops
from train_gpt import hidden_matrix_shapes

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"


def launch(scenario: str, world: int, out_dir: Path, timeout: int = 600):
    """Run a worker scenario on `world` gloo ranks; a hang fails the test at `timeout`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={world}", str(WORKER), scenario, str(out_dir)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads((out_dir / f"{scenario}_w{world}.json").read_text())


def test_what_it_cannot_do_is_refused_on_every_rank(tmp_path):
    for rank, refused in enumerate(launch("refusals", 2, tmp_path, timeout=180)):
        assert "sharded and in a group with layout='in_out'" in refused["in_out"]
        assert "normuon.NorMuon" in refused["in_out"]
        # a DTensor on a mesh of this rank alone, while the optimizer's group has both
        assert f"mesh of ranks [{rank}]" in refused["other_mesh"]
        assert "process group has ranks [0, 1]" in refused["other_mesh"]
        for action in ("deepcopy", "pickle"):
            assert "cannot be copied or pickled" in refused[action]


def test_ranks_that_disagree_on_gradients_all_raise_and_nothing_is_updated(tmp_path):
    # rank 1 lacks one matrix's gradient, then all of them: without an agreement step gloo
    # aborts in the all-to-all, or the other ranks wait forever for rank 1's all-reduce
    per_rank = launch("gradient_mismatch", 2, tmp_path, timeout=180)
    for case, culprit in (("one_missing", "'c.weight'"), ("all_missing", "'a.weight'")):
        errors = {ranks[case]["error"] for ranks in per_rank}
        assert len(errors) == 1, errors                   # the same error on every rank
        error = errors.pop()
        assert f"{culprit} has one on ranks [0] and none on ranks [1]" in error
        assert all(ranks[case]["unchanged"] for ranks in per_rank)


def test_hsdp_two_by_two_matches_the_single_device_optimizer(tmp_path):
    runs = launch("hsdp_parity", 4, tmp_path)
    for rank, rank_runs in enumerate(runs):
        for run in rank_runs:
            label = f"rank {rank} {run['algorithm']} {run['adjust_lr']}"
            assert run["error"] < 1e-5, label
            assert run["row_world"] == 2 and run["replicas"] == 2, label
    # each replica group spreads the orthogonalization over its own two ranks, alike
    assert runs[0][0]["flops"] == runs[2][0]["flops"]
    assert runs[0][0]["stats"] == runs[2][0]["stats"]


def test_hsdp_checkpoint_loads_on_other_meshes(tmp_path):
    assert launch("hsdp_save", 4, tmp_path)["saved"]
    for world, mesh in ((2, [1, 2]), (4, [4, 1])):
        loaded = launch("hsdp_load", world, tmp_path)
        assert loaded["mesh"] == mesh
        assert loaded["error"] < 1e-5, mesh


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parity_with_single_device_optimizer(world, tmp_path):
    for run in launch("parity", world, tmp_path):
        label = f"W={world} {run['algorithm']} {run['adjust_lr']} {run['orthogonalizer']}"
        # svd: the exact factor, fp32 on the wire. newton_schulz: bf16 on the wire, and the
        # owner rounds U to bf16 exactly as the single-device optimizer does, so only the
        # summation order of norms and gradients differs. Both on well-conditioned gradients;
        # the worker's docstring says why the model's own are checked to bf16 tolerance.
        assert run["fsdp_error"] < 1e-5, label
        assert run["ddp_error"] < 1e-5, label
        assert run["frozen_untouched"], label
        if run["backward_error"] is not None:   # real backward passes through FSDP2
            assert run["backward_error"] < 1e-2, label


def test_bytes_communicated_match_two_plus_two_bytes_per_element(tmp_path):
    world = 3
    result = launch("communication", world, tmp_path)
    expected_sent = [0] * world
    expected_received = [0] * world
    for matrix in result["matrices"]:
        m, n = matrix["shape"][0], matrix["shape"][1]
        rows = [len(c) for c in torch.arange(m).chunk(world)]   # FSDP2's split, independently
        rows += [0] * (world - len(rows))
        owner = matrix["owner"]
        for rank in range(world):
            if rank != owner:   # bf16 rows to the owner, bf16 rows of O back
                expected_sent[rank] += 2 * rows[rank] * n
                expected_received[rank] += 2 * rows[rank] * n
                expected_received[owner] += 2 * rows[rank] * n
                expected_sent[owner] += 2 * rows[rank] * n
    for rank, stats in enumerate(result["stats"]):
        assert stats["bytes_sent"] == pytest.approx(expected_sent[rank], rel=0.05)
        assert stats["bytes_received"] == pytest.approx(expected_received[rank], rel=0.05)
        assert stats["bytes_sent"] >= expected_sent[rank]      # plus the small all-reduce
    total_elements = sum(m["shape"][0] * m["shape"][1] for m in result["matrices"])
    assert sum(s["bytes_sent"] for s in result["stats"]) == pytest.approx(
        4 * total_elements * (1 - 1 / world), rel=0.05)


def test_owner_assignment_balances_gpt2_newton_schulz_flops_at_eight_ranks():
    shapes = hidden_matrix_shapes(12, 768)                       # GPT-2 124M's 48 matrices
    owners = assign_owners([newton_schulz_flops(m, n) for m, n in shapes], world=8)
    load = [0] * 8
    for (m, n), owner in zip(shapes, owners):
        load[owner] += newton_schulz_flops(m, n)
    mean = sum(load) / 8
    assert max(load) <= 1.05 * mean, [round(x / mean, 3) for x in load]


def test_newton_schulz_flops_count_the_three_matmuls():
    m, n, steps = 96, 40, 5    # r = 40, c = 96: X X^T and B X are r*r*c MACs each, A A is r^3
    assert newton_schulz_flops(m, n, steps) == steps * 2 * (40 * 40 * 96 * 2 + 40 ** 3)
    assert newton_schulz_flops(n, m, steps) == newton_schulz_flops(m, n, steps)


@pytest.mark.parametrize("m, world", [(10, 4), (5, 4), (2, 3), (13, 1), (8, 4)])
def test_shard_rows_follow_torch_chunk(m, world):
    expected = [len(c) for c in torch.arange(m).chunk(world)]
    assert shard_rows(m, world) == expected + [0] * (world - len(expected))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp")


def test_checkpoint_is_complete_at_construction_and_resumes_bit_exactly(checkpoint_dir):
    result = launch("checkpoint", 2, checkpoint_dir)
    assert result["complete_at_construction"]
    assert result["bit_exact"]
    assert result["second_moment_dtype"] == "torch.float32"


def test_checkpoint_saved_at_two_ranks_loads_at_three(checkpoint_dir):
    if not (checkpoint_dir / "dcp_w2").exists():
        launch("checkpoint", 2, checkpoint_dir)
    assert launch("reshard", 3, checkpoint_dir)["error"] < 1e-5


def test_compiled_step_agrees_with_eager_and_lr_changes_do_not_recompile(tmp_path):
    result = launch("compile", 2, tmp_path)
    assert result["recompiled"] is False, result["recompiled"]
    assert result["error"] < 0.05      # bf16 precision: the fused and eager kernels round apart


def test_moe_experts_sharded_by_fsdp2_step_locally_and_match_the_single_device_optimizer(
        tmp_path):
    pytest.importorskip("transformers")
    for world in (2, 3):   # 3 ranks, 4 experts: 2, 2 and none per rank
        runs = launch("moe", world, tmp_path)
        assert [run["local_experts"] for run in runs] == [len(c) for c in
                                                          torch.arange(4).chunk(world)] + \
            [0] * (world - len(torch.arange(4).chunk(world)))
        for rank, run in enumerate(runs):
            assert run["exchanged"] == 0                 # whole experts: no owner, no exchange
            assert run["error"] < 1e-5, (world, rank)
    # the W=2 checkpoint, loaded at W=3, is the 3-step state and steps on as one run does
    assert all(run["resumed_error"] < 1e-5 for run in runs)


@pytest.mark.parametrize("world", [2, 3])
def test_grouped_conv_cut_by_a_shard_matches_the_single_device_optimizer(world, tmp_path):
    # at W=2 rank 0 holds rows 0-4 of the (9, 2, 3) conv: all of group 0 and part of group 1
    for run in launch("grouped", world, tmp_path):
        assert run["blocks"] == [1, 2, 3]
        assert run["error"] < 1e-5, run


@pytest.mark.parametrize("world", [2, 3])
def test_split_blocks_and_cautious_decay_sharded_match_the_single_device_optimizer(
        world, tmp_path):
    # the (9, 5) weight's blocks [2, 3, 4] are cut by the shard boundary at rows 5 (W=2) and
    # 3, 6 (W=3): the owner orthogonalizes whole blocks; the experts step on their own ranks
    runs = launch("blocks", world, tmp_path)
    assert len(runs) == 8
    for run in runs:
        assert run["exchanged"] == 2, run       # the two split Linears go through owners
        assert run["error"] < 1e-5, run
