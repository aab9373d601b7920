"""train_gpt.py end to end on CPU: the shard format, broken files, python and torchrun runs
(the 2-rank run against the 1-rank run), exact resume, and every --optimizer."""
import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpt
from train_gpt import build_stdlib_corpus, read_shard, write_shard

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n-layer", "2", "--dim", "64", "--n-head", "2", "--seq-len", "64",
         "--micro-batch", "8", "--tokens-per-step", "1024", "--val-tokens", "16384",
         "--lr", "1e-2", "--adam-lr", "2e-2", "--device", "cpu", "--no-compile"]


def read_log(out_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "summary"
    return [r for r in records if r["kind"] == "val"], records[-1]


def run_cli(args, launcher=(sys.executable,), timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, str(ROOT / "train_gpt.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# ----------------------------------------------------------------------------- shards

def test_shard_round_trip_in_the_speedrun_format(tmp_path):
    tokens = [0, 1, 255, 256, 50256, 65535] * 3
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    header = struct.unpack("<256i", raw[:1024])   # read back independently of read_shard
    assert header[:3] == (20240520, 1, len(tokens)) and not any(header[3:])
    assert len(raw) == 1024 + 2 * len(tokens)
    assert list(struct.unpack(f"<{len(tokens)}H", raw[1024:])) == tokens
    assert read_shard(path).to(torch.int64).tolist() == tokens


def corrupt(path: Path, kind: str) -> None:
    raw = bytearray(path.read_bytes())
    if kind == "magic":
        raw[0:4] = struct.pack("<i", 12345)
    elif kind == "version":
        raw[4:8] = struct.pack("<i", 7)
    elif kind == "truncated":
        del raw[-10:]
    elif kind == "header":
        del raw[100:]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind, message", [
    ("magic", "magic number 12345"), ("version", "shard version 7"),
    ("truncated", "truncated or corrupt"), ("header", "shorter than a shard"),
    ("vocab", "token id 300 is outside the model's vocabulary of 256"),
])
def test_broken_shard_stops_the_run_before_training_naming_the_file(tmp_path, kind, message):
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    data_dir.mkdir()
    write_shard(data_dir / "a_val_000000.bin", list(range(256)) * 200)
    bad = data_dir / "a_train_000001.bin"
    write_shard(data_dir / "a_train_000000.bin", list(range(256)) * 200)
    write_shard(bad, list(range(256)) * 199 + [300] * (256 if kind == "vocab" else 0))
    if kind != "vocab":
        corrupt(bad, kind)
    with pytest.raises(ValueError, match=message) as error:
        train_gpt.main([*SMALL, "--data-dir", str(data_dir), "--out-dir", str(out_dir),
                        "--max-steps", "200"])
    assert str(bad) in str(error.value)
    if kind != "vocab":   # headers are checked at start-up; token ids as a shard is opened
        assert not (out_dir / "log.jsonl").exists()      # nothing ran


def test_start_up_reads_shard_headers_only(tmp_path, monkeypatch):
    for index in range(50):
        write_shard(tmp_path / f"d_train_{index:06d}.bin", [7] * 5000)
    write_shard(tmp_path / "d_val_000000.bin", [7] * 5000)

    def no_token_reads(*args):
        raise AssertionError("start-up read a shard's tokens")

    for name in ("read_shard", "map_shard", "check_token_range"):
        monkeypatch.setattr(train_gpt, name, no_token_reads)
    cfg = train_gpt.PRESETS["tiny"]
    train, val = train_gpt.prepare_data(dataclasses.replace(cfg, micro_batch=2, seq_len=64),
                                        tmp_path, 0, 1)
    assert len(train) == 50 and len(val) == 1


def reference_batches(files, B, T, rank, world, count):
    """The token stream as plain reads of whole shards: each micro-step takes world*B*T
    tokens, rank r the r-th (B, T) block; a shard too short for the next step is left."""
    batches, index, position = [], 0, 0
    tokens = read_shard(files[0]).to(torch.int64)
    for _ in range(count):
        if position + world * B * T + 1 > len(tokens):
            index, position = (index + 1) % len(files), 0
            tokens = read_shard(files[index]).to(torch.int64)
        start = position + rank * B * T
        batches.append(tokens[start:start + B * T + 1])
        position += world * B * T
    return batches


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_token_stream_serves_the_shards_in_order_and_resumes(tmp_path, rank, world):
    gen = torch.Generator().manual_seed(0)
    files = []
    for index, length in enumerate((3000, 1000, 2500)):
        files.append(tmp_path / f"s_train_{index:06d}.bin")
        write_shard(files[-1], torch.randint(0, 256, (length,), generator=gen))
    expected = reference_batches(files, 4, 32, rank, world, 40)   # wraps around twice
    stream = train_gpt.TokenStream(files, 4, 32, rank, world, 256)
    served = []
    for i in range(40):
        if i == 17:   # a resume: a new stream continues from the saved position
            state = stream.state()
            stream = train_gpt.TokenStream(files, 4, 32, rank, world, 256)
            stream.load_state(state)
        x, y = stream.next_batch(torch.device("cpu"))
        served.append(torch.cat([x.flatten(), y.flatten()[-1:]]))
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
    for a, b in zip(served, expected, strict=True):
        assert torch.equal(a, b)


def test_data_dir_without_val_shards_is_refused(tmp_path):
    write_shard(tmp_path / "only_train_000000.bin", list(range(256)) * 100)
    with pytest.raises(FileNotFoundError, match="found 1 train and 0 val"):
        train_gpt.main([*SMALL, "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])


def test_stdlib_corpus_is_split_by_file_and_deterministic(corpus, tmp_path):
    train, val = train_gpt.find_shards(corpus)
    val_text = b"".join(bytes(read_shard(p).to(torch.uint8).tolist()) for p in val)
    assert len(val_text) > 100_000 and len(train) >= 5
    again = tmp_path / "again"
    build_stdlib_corpus(again, shard_tokens=2_000_000)
    assert sorted(p.name for p in again.glob("*.bin")) == sorted(p.name for p in corpus.glob("*.bin"))
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in val)


@pytest.mark.parametrize("flags, message", [
    (["--n-head", "5"], r"--dim 128 is not divisible by --n-head 5.*\[1, 2, 4, 8, 16, 32, 64\]"),
    (["--n-head", "128"], r"--dim 128 / --n-head 128 gives an odd head size 1"),
    (["--n-layer", "0"], r"--n-layer must be >= 1, got 0"),
])
def test_a_model_shape_the_gpt_cannot_have_is_named_before_any_data_is_read(tmp_path, flags,
                                                                          message):
    # the data folder does not exist: had the script read data first, that error would come
    with pytest.raises(ValueError, match=message):
        train_gpt.main(["--preset", "tiny", *flags, "--data-dir", str(tmp_path / "none"),
                        "--out-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_tokens_per_step_must_divide_into_ranks_and_micro_batches(tmp_path, corpus):
    with pytest.raises(ValueError, match="--tokens-per-step 1000 is not a multiple"):
        train_gpt.main([*SMALL, "--tokens-per-step", "1000", "--data-dir", str(corpus),
                        "--out-dir", str(tmp_path)])


# ----------------------------------------------------------------------------- runs

def test_python_run_learns_and_writes_its_summary(tmp_path, corpus):
    out = tmp_path / "out"
    result = run_cli([*SMALL, "--data-dir", str(corpus), "--out-dir", str(out),
                      "--max-steps", "40", "--val-every", "20"])
    assert result.returncode == 0, result.stderr[-3000:]
    evals, summary = read_log(out)
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5    # from ln(256) = 5.55
    assert summary["steps"] == 40 and summary["finished"] and summary["world_size"] == 1
    # every step was timed (no compile warm-up on CPU), so the rate accounts for every token
    tokens = summary["tokens_per_s"] * summary["train_time_s"]
    assert abs(tokens - 40 * summary["config"]["tokens_per_step"]) < 1e-6 * tokens
    assert 0 < summary["optimizer_time_s"] < summary["train_time_s"]
    assert "val loss" in result.stderr + result.stdout


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("one_rank")
    result = run_cli([*SMALL, "--data-dir", str(corpus), "--out-dir", str(out),
                      "--max-steps", "30", "--val-every", "10"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_torchrun_two_ranks_match_one_rank(tmp_path, corpus, one_rank_run, parallel):
    # 1024 tokens per step: one rank reads two micro-batches of 512, two ranks one each, the
    # same tokens, so the averaged gradient equals the single rank's accumulated one; and
    # DistributedNorMuon (fsdp) steps like NorMuon.
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2")
    double = run_cli([*SMALL, "--data-dir", str(corpus), "--max-steps", "30",
                      "--val-every", "10", "--out-dir", str(tmp_path), "--parallel", parallel],
                     launcher=launcher)
    assert double.returncode == 0, double.stderr[-3000:]

    one_evals, _ = read_log(one_rank_run)
    two_evals, two_summary = read_log(tmp_path)
    assert two_summary["world_size"] == 2 and two_summary["parallel"] == parallel
    assert two_evals[-1]["val_loss"] < two_evals[0]["val_loss"] - 1.0
    for a, b in zip(one_evals, two_evals, strict=True):
        assert a["step"] == b["step"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        # the logged train loss is the mean over micro-batches and ranks: one rank's two
        # micro-batches are the two ranks' one each
        if a["train_loss"] is not None:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_torchrun_hsdp_two_by_two_matches_one_rank(tmp_path, corpus, one_rank_run):
    # 4 ranks as 2 replica groups of 2: rows sharded within a group, groups replicated. Each
    # rank reads a quarter (4 sequences) of the one-rank run's two micro-batches of 8: the
    # same tokens per step, so the same losses
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=4")
    result = run_cli([*SMALL, "--data-dir", str(corpus), "--max-steps", "30",
                      "--val-every", "10", "--out-dir", str(tmp_path), "--replicas", "2",
                      "--micro-batch", "4"], launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one_evals, _ = read_log(one_rank_run)
    hsdp_evals, summary = read_log(tmp_path)
    assert summary["world_size"] == 4 and summary["replicas"] == 2
    for a, b in zip(one_evals, hsdp_evals, strict=True):
        assert a["step"] == b["step"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)


def test_replicas_must_divide_the_ranks(tmp_path, corpus):
    with pytest.raises(ValueError, match="--replicas 3 must divide the number of ranks 1"):
        train_gpt.main([*SMALL, "--data-dir", str(corpus), "--out-dir", str(tmp_path),
                        "--replicas", "3"])


def test_stop_where_the_target_is_first_reached_and_resume_keeps_the_speedrun_metric(
        tmp_path, corpus):
    common = [*SMALL, "--data-dir", str(corpus), "--max-steps", "24", "--val-every", "4"]
    train_gpt.main([*common, "--out-dir", str(tmp_path / "probe")])
    probe, _ = read_log(tmp_path / "probe")
    # the target: the lowest val loss up to step 20, first reached at its step
    first = min((e for e in probe if e["step"] <= 20), key=lambda e: e["val_loss"])["step"]
    losses = {e["step"]: e["val_loss"] for e in probe}
    target = ["--target-val-loss", repr(losses[first])]
    straight = train_gpt.main([*common, *target, "--out-dir", str(tmp_path / "straight")])
    train_gpt.main([*common, *target, "--out-dir", str(tmp_path / "split"),
                    "--stop-at-step", str(first)])
    resumed = train_gpt.main([*common, *target, "--out-dir", str(tmp_path / "split"),
                              "--resume", str(tmp_path / "split")])
    assert straight["target_reached_step"] == resumed["target_reached_step"] == first
    split, _ = read_log(tmp_path / "split")
    at_stop = next(e for e in split if e["step"] == first)   # the clock of the stopped run
    assert resumed["target_reached_time_s"] == at_stop["train_time_s"] > 0
    assert [e["step"] for e in split] == [e["step"] for e in probe]   # each step logged once


def test_broken_or_foreign_checkpoint_is_refused_naming_the_file(tmp_path, corpus):
    common = [*SMALL, "--data-dir", str(corpus), "--max-steps", "8", "--val-every", "4"]
    train_gpt.main([*common, "--out-dir", str(tmp_path / "run"), "--stop-at-step", "4"])
    checkpoint = tmp_path / "run" / "checkpoint_000004.pt"
    truncated = tmp_path / "truncated" / "checkpoint_000004.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable checkpoint.*truncated") as error:
        train_gpt.main([*common, "--out-dir", str(tmp_path / "a"), "--resume", str(truncated)])
    assert str(truncated) in str(error.value)
    with pytest.raises(ValueError, match=r"another model \(n_layer 2 there, 3 here") as error:
        train_gpt.main([*common, "--n-layer", "3", "--out-dir", str(tmp_path / "b"),
                        "--resume", str(checkpoint)])
    assert str(checkpoint) in str(error.value)
    for out in ("a", "b"):
        assert not (tmp_path / out / "log.jsonl").exists()   # stopped before any work


def test_shard_named_both_train_and_val_is_refused(tmp_path):
    write_shard(tmp_path / "a_train_000000.bin", list(range(256)) * 10)
    write_shard(tmp_path / "a_val_000000.bin", list(range(256)) * 10)
    write_shard(tmp_path / "trainval_000000.bin", list(range(256)) * 10)
    with pytest.raises(ValueError, match="trainval_000000.bin: the name contains both"):
        train_gpt.find_shards(tmp_path)


def test_mixed_precision_is_bf16_compute_with_fp32_reduction_on_cuda_only():
    cuda = train_gpt.mixed_precision(torch.device("cuda"))
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    cpu = train_gpt.mixed_precision(torch.device("cpu"))
    assert cpu.param_dtype is None and cpu.reduce_dtype is None


def worker_pids(launcher_pid: int) -> list[int]:
    """The processes torchrun started (its children that run train_gpt.py)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return [int(pid) for pid in children
            if "train_gpt.py" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]


def test_sigterm_saves_on_every_rank_exits_cleanly_and_resumes_exactly(tmp_path, corpus):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    common = [*SMALL, "--data-dir", str(corpus), "--max-steps", "200", "--val-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    process = subprocess.Popen([*launcher, str(ROOT / "train_gpt.py"), *common, "--out-dir",
                                str(run_dir)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        log = run_dir / "log.jsonl"
        while not (log.exists() and log.read_text().count("\n") >= 2):   # training is under way
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = worker_pids(process.pid)
        assert len(workers) == 2
        for pid in workers:            # as a scheduler preempting the job signals every task
            os.kill(pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    _, summary = read_log(run_dir)
    assert summary["interrupted"] and not summary["finished"]
    stopped_at = summary["steps"]
    assert (run_dir / f"checkpoint_{stopped_at:06d}.pt").exists()

    for args in ([*common, "--out-dir", str(run_dir), "--resume", str(run_dir), "--max-steps",
                  "200", "--stop-at-step", str(stopped_at + 6)],
                 [*common, "--out-dir", str(tmp_path / "straight"), "--stop-at-step",
                  str(stopped_at + 6)]):
        result = run_cli(args, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    resumed, _ = read_log(run_dir)
    straight, _ = read_log(tmp_path / "straight")
    assert [(e["step"], e["val_loss"], e["train_loss"]) for e in resumed] == \
           [(e["step"], e["val_loss"], e["train_loss"]) for e in straight]


def test_resume_continues_bit_exactly(tmp_path, corpus):
    common = [*SMALL, "--data-dir", str(corpus), "--max-steps", "24", "--val-every", "4"]
    train_gpt.main([*common, "--out-dir", str(tmp_path / "straight")])
    train_gpt.main([*common, "--out-dir", str(tmp_path / "split"), "--stop-at-step", "12"])
    assert (tmp_path / "split" / "checkpoint_000012.pt").exists()
    train_gpt.main([*common, "--out-dir", str(tmp_path / "split"),
                    "--resume", str(tmp_path / "split")])

    straight, _ = read_log(tmp_path / "straight")
    split, summary = read_log(tmp_path / "split")
    assert summary["steps"] == 24 and summary["finished"]
    assert [(e["step"], e["val_loss"], e["train_loss"]) for e in straight] == \
           [(e["step"], e["val_loss"], e["train_loss"]) for e in split]


@pytest.mark.parametrize("optimizer", ["normuon", "muon", "adamw"])
def test_every_optimizer_choice_trains(tmp_path, corpus, optimizer):
    summary = train_gpt.main([*SMALL, "--data-dir", str(corpus), "--out-dir", str(tmp_path),
                              "--max-steps", "30", "--val-every", "30",
                              "--optimizer", optimizer])
    evals, _ = read_log(tmp_path)
    assert summary["optimizer"] == optimizer
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_cautious_decay_and_per_head_qk_blocks_train(tmp_path, corpus):
    summary = train_gpt.main([*SMALL, "--data-dir", str(corpus), "--out-dir", str(tmp_path),
                              "--max-steps", "30", "--val-every", "30", "--cautious-wd",
                              "--split-qkv", "heads"])
    evals, _ = read_log(tmp_path)
    assert summary["finished"] and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_optimizer_choice_sets_the_hidden_matrices_algorithm():
    model = train_gpt.GPT(train_gpt.PRESETS["tiny"])
    for choice in ("normuon", "muon", "adamw"):
        optimizer = train_gpt.build_optimizer(model, train_gpt.PRESETS["tiny"], choice)
        hidden, other = optimizer.param_groups
        assert hidden["algorithm"] == choice and other["algorithm"] == "adamw"
        assert {n.split(".")[0] for n in other["param_names"]} == {"embed", "lm_head"}
        assert all(n.startswith("blocks.") for n in hidden["param_names"])


def test_torchrun_fsdp_resume_continues_bit_exactly_and_on_one_rank(tmp_path, corpus):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2")
    common = [*SMALL, "--data-dir", str(corpus), "--max-steps", "16", "--val-every", "4"]
    runs = [[*common, "--out-dir", str(tmp_path / "straight")],
            [*common, "--out-dir", str(tmp_path / "split"), "--stop-at-step", "8"],
            [*common, "--out-dir", str(tmp_path / "split"), "--resume", str(tmp_path / "split")]]
    for args in runs:
        result = run_cli(args, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    straight, _ = read_log(tmp_path / "straight")
    split, _ = read_log(tmp_path / "split")
    assert [(e["step"], e["val_loss"], e["train_loss"]) for e in straight] == \
           [(e["step"], e["val_loss"], e["train_loss"]) for e in split]

    # the checkpoint holds whole tensors: one process can carry on what two ranks began
    single = run_cli([*common, "--out-dir", str(tmp_path / "single"),
                      "--resume", str(tmp_path / "split" / "checkpoint_000008.pt")])
    assert single.returncode == 0, single.stderr[-3000:]
    continued, summary = read_log(tmp_path / "single")
    assert summary["finished"] and summary["world_size"] == 1
    expected = {e["step"]: e["val_loss"] for e in straight}
    assert [e["step"] for e in continued] == [12, 16]
    for e in continued:
        assert e["val_loss"] == pytest.approx(expected[e["step"]], rel=1e-4)
