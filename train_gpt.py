"""train_gpt.py: a small modern GPT trained with NorMuon, launched the way speedrunners do.

    pip install -r requirements.txt
    python train_gpt.py                                     # CPU: tiny byte-level GPT, minutes
    torchrun --standalone --nproc_per_node=2 train_gpt.py   # 2 processes: FSDP2 + distributed.py
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset gpt2 --data-dir fineweb10B
    torchrun --nnodes=2 --nproc_per_node=8 ... train_gpt.py --replicas 2   # HSDP across nodes

With no --data-dir the training text is this Python installation's own standard library,
split by file into train and val and cached once as token shards (byte-level, vocab 256).
--data-dir reads shards of the speedrun format (a 256 x int32 header: magic 20240520,
version 1, token count; then uint16 tokens), e.g. the FineWeb10B GPT-2 caches, unchanged.
Each evaluation and a final summary go to <out-dir>/log.jsonl as one JSON line each.
Ctrl-C or SIGTERM saves a checkpoint at the end of the current step and exits cleanly;
--resume <out-dir> continues (bit for bit on CPU).
With several ranks the model is sharded with FSDP2 and stepped by distributed.py's
DistributedNorMuon (--parallel ddp: replicated model, single-device optimizer, for comparison).

Sections: configuration, model, data, optimizer, evaluation, checkpoints, training loop.
"""
import argparse
import array
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import json
import os
import pickle
import random
import resource
import signal
import struct
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distributed import DistributedNorMuon
from normuon import ORTHOGONALIZERS, NorMuon, param_groups

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class Config:
    vocab_size: int
    n_layer: int
    n_head: int
    dim: int
    seq_len: int
    tokens_per_step: int    # global batch, over all ranks and gradient-accumulation steps
    micro_batch: int        # sequences per rank per forward pass
    max_steps: int
    val_every: int
    val_tokens: int
    lr: float               # hidden matrices (AdamW scale: NorMuon's updates have RMS 0.2*lr)
    adam_lr: float          # embeddings and head, always AdamW
    weight_decay: float     # hidden matrices only
    cooldown_frac: float    # the lr decays linearly to 0 over this last fraction of the steps
    target_val_loss: float

    def tokens_per_pass(self, world: int) -> int:
        """Tokens of one forward pass of every rank (a micro-step)."""
        return world * self.micro_batch * self.seq_len


PRESETS = {
    # byte-level; on 2 CPU cores a few minutes. lr: the best NorMuon lr of the sweep in
    # bench/RESULTS.md (Muon's was 4e-3, AdamW's 2e-3: pass --lr with --optimizer)
    "tiny": Config(vocab_size=256, n_layer=4, n_head=4, dim=128, seq_len=256,
                   tokens_per_step=8192, micro_batch=16, max_steps=600, val_every=100,
                   val_tokens=131072, lr=8e-3, adam_lr=1e-2, weight_decay=0.1,
                   cooldown_frac=0.4, target_val_loss=1.6),
    # the 124M speedrun model: GPT-2 vocabulary padded to a multiple of 128, ~0.5M tokens/step
    "gpt2": Config(vocab_size=50304, n_layer=12, n_head=12, dim=768, seq_len=1024,
                   tokens_per_step=524288, micro_batch=32, max_steps=5000, val_every=125,
                   val_tokens=10485760, lr=2e-3, adam_lr=6e-3, weight_decay=0.1,
                   cooldown_frac=0.4, target_val_loss=3.28),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, help="tiny on CPU, gpt2 on CUDA (default)")
    parser.add_argument("--optimizer", choices=("normuon", "muon", "adamw"), default="normuon",
                        help="for the hidden matrices; embeddings and head always use adamw")
    parser.add_argument("--data-dir", type=Path,
                        help="folder of *train*.bin / *val*.bin shards (default: stdlib corpus)")
    parser.add_argument("--out-dir", type=Path, default=Path("out"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp",
                        help="with several ranks: FSDP2 + DistributedNorMuon, or DDP + NorMuon")
    parser.add_argument("--replicas", type=int, default=1,
                        help="HSDP across nodes: shard within each of this many replica groups "
                             "(e.g. the number of nodes), replicate across them (default 1)")
    parser.add_argument("--cautious-wd", action="store_true",
                        help="cautious weight decay on the hidden matrices: decay only where "
                             "the update also moves the weight toward zero")
    parser.add_argument("--orthogonalizer", choices=ORTHOGONALIZERS, default="newton_schulz",
                        help="of the hidden matrices' momentum (gram_newton_schulz: the same "
                             "polynomial on the Gram matrix, fewer FLOPs on wide and tall ones)")
    parser.add_argument("--split-qkv", choices=QKV_SPLITS, default="none",
                        help="orthogonalize the fused qkv weight in blocks: 'qkv' q, k, v "
                             "apart; 'heads' q and k per head, v whole (default none: one "
                             "matrix)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the model (default: on for CUDA, off for CPU)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--stop-at-step", type=int,
                        help="save a checkpoint and exit at this step (the schedule still "
                             "runs to --max-steps; continue with --resume)")
    parser.add_argument("--resume", type=Path, help="a checkpoint file, or an out dir")
    for field in dataclasses.fields(Config):   # every preset value can be overridden
        parser.add_argument(flag(field.name), type=field.type)
    return parser.parse_args(argv)


def flag(field: str) -> str:
    """The command-line flag of a Config field: n_head -> --n-head."""
    return "--" + field.replace("_", "-")


def resolve_config(args, device: torch.device) -> Config:
    preset = args.preset or ("gpt2" if device.type == "cuda" else "tiny")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    check_model_shape(cfg)
    return cfg


def check_model_shape(cfg: Config) -> None:
    """Raise a ValueError naming the flags of a model shape the GPT cannot have, before any
    data is read (the first forward pass would fail with a reshape error)."""
    for name in ("vocab_size", "n_layer", "n_head", "dim", "seq_len", "micro_batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    if cfg.dim % cfg.n_head:
        divisors = [h for h in range(1, cfg.dim + 1) if cfg.dim % h == 0 and cfg.dim // h % 2 == 0]
        raise ValueError(f"--dim {cfg.dim} is not divisible by --n-head {cfg.n_head}: each head "
                         f"takes dim/n_head channels; for --dim {cfg.dim} choose --n-head "
                         f"from {divisors}, or change --dim")
    if cfg.dim // cfg.n_head % 2:
        raise ValueError(f"--dim {cfg.dim} / --n-head {cfg.n_head} gives an odd head size "
                         f"{cfg.dim // cfg.n_head}; rotary embeddings turn channels in pairs, so "
                         f"it must be even: change --n-head or --dim")


# ----------------------------------------------------------------------------- model

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inverse_frequency = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_seq_len).float(), inverse_frequency)  # (T, d/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:                 # x: (B, H, T, d)
        cos, sin = self.cos[:x.size(-2)], self.sin[:x.size(-2)]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, max_seq_len: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(dim // n_head, max_seq_len)

    def forward(self, x: Tensor) -> Tensor:                 # x: (B, T, D)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3,
                            h=self.n_head)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))   # QK-norm, then RoPE
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash on CUDA
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


QKV_SPLITS = ("none", "qkv", "heads")


def qkv_split_sizes(dim: int, n_head: int, split: str) -> list[int] | None:
    """Neurons per block of Attention.qkv's weight (3*dim, dim), whose rows are (three h d):
    None (one matrix), [dim] * 3, or q's and k's heads apart and v whole."""
    if split == "qkv":
        return [dim] * 3
    if split == "heads":
        return [dim // n_head] * (2 * n_head) + [dim]
    return None


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())        # ReLU^2


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, max_seq_len: int):
        super().__init__()
        self.attn = Attention(dim, n_head, max_seq_len)
        self.mlp = MLP(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_head, cfg.seq_len)
                                    for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)   # untied
        for block in self.blocks:   # every residual branch starts as the identity
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
        nn.init.zeros_(self.lm_head.weight)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:   # idx, targets: (B, T)
        x = rms_norm(self.embed(idx))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(rms_norm(x)).float()           # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hidden_matrix_shapes(n_layer: int, dim: int) -> list[tuple[int, int]]:
    """The (out, in) shapes of the matrices NorMuon steps in a GPT of this depth and width, read
    off the model itself (built on the meta device, so nothing is allocated): for benchmarks."""
    with torch.device("meta"):
        model = GPT(dataclasses.replace(PRESETS["gpt2"], n_layer=n_layer, dim=dim, n_head=1))
    return [tuple(p.shape) for _, p in param_groups(model, head=model.lm_head)[0]["params"]]


# ----------------------------------------------------------------------------- data

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS


def write_shard(path: Path, tokens) -> None:
    """Write tokens (a list, bytes or 1-D tensor of ints < 65536) as a shard, atomically."""
    data = array.array("H", tokens.tolist() if isinstance(tokens, Tensor) else list(tokens))
    if sys.byteorder == "big":
        data.byteswap()
    header = struct.pack(f"<{HEADER_INTS}i", SHARD_MAGIC, SHARD_VERSION, len(data),
                         *[0] * (HEADER_INTS - 3))
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        f.write(header)
        f.write(data.tobytes())
    os.replace(temporary, path)


def read_shard_header(path: Path) -> int:
    """Check a shard's header and size; return its token count."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than a shard's {HEADER_BYTES}-byte "
                         f"header; the file is truncated or not a token shard")
    magic, version, n_tokens = struct.unpack("<3i", header[:12])
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: magic number {magic}, expected {SHARD_MAGIC}; "
                         f"not a speedrun token shard")
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {version}, this script reads version "
                         f"{SHARD_VERSION}")
    if size != HEADER_BYTES + 2 * n_tokens:
        raise ValueError(f"{path}: header says {n_tokens} tokens ({HEADER_BYTES + 2 * n_tokens} "
                         f"bytes) but the file has {size} bytes; it is truncated or corrupt")
    return n_tokens


def read_shard(path: Path) -> Tensor:
    """All tokens of a shard, (N,) uint16."""
    read_shard_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        data = bytearray(f.read())
    if sys.byteorder == "big":
        swapped = array.array("H", bytes(data))
        swapped.byteswap()
        data = bytearray(swapped.tobytes())
    return torch.frombuffer(data, dtype=torch.uint16) if data else torch.empty(0, dtype=torch.uint16)


def map_shard(path: Path) -> Tensor:
    """A shard's tokens (N,) uint16, memory-mapped: pages are read when first touched, so
    opening a shard costs nothing and only the tokens a rank reads come off the disk."""
    n_tokens = read_shard_header(path)
    if sys.byteorder == "big" or n_tokens == 0:   # the file is little-endian
        return read_shard(path)
    offset = HEADER_BYTES // 2
    return torch.from_file(str(path), shared=False, size=offset + n_tokens,
                           dtype=torch.uint16)[offset:]


def check_token_range(path: Path, tokens: Tensor, vocab_size: int) -> None:
    # chunks below torch's parallel grain size (32768) run on the calling thread alone: run
    # from the stream's background thread, larger ones started a second OpenMP team, whose
    # spinning threads slowed the training thread by 10-15% on a 2-core machine (measured)
    chunk = 1 << 15
    largest = max((int(tokens[i:i + chunk].to(torch.int32).max())
                   for i in range(0, len(tokens), chunk)), default=-1)
    if largest >= vocab_size:
        raise ValueError(f"{path}: token id {largest} is outside the model's vocabulary of "
                         f"{vocab_size}; wrong tokenizer, or choose a matching --preset/"
                         f"--vocab-size")


def find_shards(data_dir: Path) -> tuple[list[Path], list[Path]]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a folder")
    shards = sorted(data_dir.glob("*.bin"))
    for path in shards:
        if "train" in path.name and "val" in path.name:
            raise ValueError(f"{path}: the name contains both 'train' and 'val', so it would be "
                             f"read as training and as validation data; rename it")
    train = [p for p in shards if "train" in p.name]
    val = [p for p in shards if "val" in p.name]
    if not train or not val:
        raise FileNotFoundError(f"--data-dir {data_dir} needs *train*.bin and *val*.bin shards; "
                                f"found {len(train)} train and {len(val)} val")
    return train, val


def build_stdlib_corpus(out_dir: Path, shard_tokens: int = 10_000_000) -> None:
    """Byte-level shards of the standard library's .py files, in a fixed shuffled order (sorted,
    the stream would end on one package, test/, for long stretches); every 50th file is
    validation, so that no file is in both. Deterministic for one Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(0).shuffle(files)
    splits = {"val": files[::50], "train": [p for i, p in enumerate(files) if i % 50]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, paths in splits.items():
        text = b"".join(p.read_bytes() for p in paths)
        for index, start in enumerate(range(0, len(text), shard_tokens)):
            write_shard(out_dir / f"stdlib_{split}_{index:06d}.bin",
                        text[start:start + shard_tokens])
    (out_dir / "COMPLETE").write_text(f"{len(files)} files from {root}\n")


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "normuon" / f"stdlib-v2-py{sys.version_info[0]}.{sys.version_info[1]}"


class TokenStream:
    """Walks the shards in order, wrapping at the end. All ranks walk the same global stream:
    each micro-step takes world*B*T tokens, of which rank r reads the r-th (B, T) block.

    Shards are memory-mapped. Opening one checks that its tokens fit the vocabulary, which
    reads it through once; a background thread does that for the next shard while this one
    is used, so its pages are in memory when the stream gets there. Batches are built in
    pinned memory on CUDA, so that copies to the GPU overlap compute."""

    def __init__(self, files: list[Path], micro_batch: int, seq_len: int, rank: int,
                 world: int, vocab_size: int):
        self.files, self.B, self.T, self.rank, self.world = files, micro_batch, seq_len, rank, world
        self.vocab_size = vocab_size
        self.shard_index, self.position, self.tokens = 0, 0, None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.opening = {0: self.pool.submit(self._checked, 0)}   # index -> Future of tokens

    def state(self) -> dict:
        return {"shard_index": self.shard_index, "position": self.position}

    def load_state(self, state: dict) -> None:
        if state["shard_index"] != self.shard_index:   # keep a shard already open
            self.tokens = None
        self.shard_index, self.position = state["shard_index"], state["position"]

    def _open(self, index: int) -> Tensor:
        """Shard `index`, checked (in the background if it was asked for ahead); then start
        on the one after it."""
        future = self.opening.pop(index, None) or self.pool.submit(self._checked, index)
        tokens = future.result()    # re-raises a broken shard's error here
        following = (index + 1) % len(self.files)
        if following != index and following not in self.opening:
            self.opening[following] = self.pool.submit(self._checked, following)
        return tokens

    def _checked(self, index: int) -> Tensor:
        tokens = map_shard(self.files[index])
        check_token_range(self.files[index], tokens, self.vocab_size)
        return tokens

    def next_batch(self, device: torch.device) -> tuple[Tensor, Tensor]:
        for future in self.opening.values():   # a broken shard ahead stops the run now
            if future.done() and future.exception():
                raise future.exception()
        span = self.world * self.B * self.T
        if self.tokens is None:
            self.tokens = self._open(self.shard_index)
        if self.position + span + 1 > len(self.tokens):       # too short for a whole step
            self.shard_index = (self.shard_index + 1) % len(self.files)
            self.position, self.tokens = 0, self._open(self.shard_index)
        start = self.position + self.rank * self.B * self.T
        chunk = self.tokens[start:start + self.B * self.T + 1].to(torch.int64)
        self.position += span
        if device.type == "cuda":
            chunk = chunk.pin_memory()
        x, y = chunk[:-1].view(self.B, self.T), chunk[1:].view(self.B, self.T)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def prepare_data(cfg: Config, data_dir: Path | None, rank: int,
                 world: int) -> tuple[list[Path], list[Path]]:
    """Find (or build) the shards and check their headers before training. (Token ids are
    checked as the stream opens each shard.)"""
    if data_dir is None:
        data_dir = default_data_dir()
        if rank == 0 and not (data_dir / "COMPLETE").exists():
            print(f"building the standard-library corpus in {data_dir} (once)")
            build_stdlib_corpus(data_dir)
        if dist.is_initialized():
            dist.barrier()
    train, val = find_shards(data_dir)
    span = cfg.tokens_per_pass(world)
    for path in train + val:   # headers and file sizes only: seconds for any number of shards
        count = read_shard_header(path)
        if count < span + 1:
            raise ValueError(f"{path}: {count} tokens, fewer than one micro-step of all ranks "
                             f"({world} x {cfg.micro_batch} x {cfg.seq_len} + 1)")
    return train, val


# ----------------------------------------------------------------------------- optimizer

def build_optimizer(model: GPT, cfg: Config, algorithm: str, sharded: bool = False,
                    compile: bool = False, cautious_wd: bool = False,
                    split_qkv: str = "none", orthogonalizer: str = "newton_schulz") -> NorMuon:
    """Hidden matrices: `algorithm` at lr (cautious decay, qkv split in blocks, orthogonalizer:
    the flags); embeddings and head: AdamW at adam_lr, no decay. A model sharded by FSDP2 gets
    the distributed optimizer."""
    splits = qkv_split_sizes(cfg.dim, cfg.n_head, split_qkv)
    groups = param_groups(model, head=model.lm_head, algorithm=algorithm, lr=cfg.adam_lr,
                          weight_decay=0.0,
                          split_sizes={"blocks.*.attn.qkv.weight": splits} if splits else None)
    options = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, cautious_weight_decay=cautious_wd,
                   orthogonalizer=orthogonalizer)
    if sharded:
        optimizer = DistributedNorMuon(groups, compile=compile, **options)
    else:
        optimizer = NorMuon(groups, **options)
    for group in optimizer.param_groups:   # the schedule scales this (torch's scheduler key)
        group["initial_lr"] = group["lr"]
    return optimizer


def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last accumulation step."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def lr_factor(step: int, cfg: Config) -> float:
    """Constant, then linear decay to 0 over the last cooldown_frac of the run."""
    cooldown_start = cfg.max_steps * (1 - cfg.cooldown_frac)
    if step < cooldown_start:
        return 1.0
    return max(0.0, (cfg.max_steps - step) / (cfg.max_steps - cooldown_start))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluation_steps(cfg: Config, val_files: list[Path], world: int) -> int:
    """Forward passes per evaluation: the first val_tokens of the val shards, all ranks."""
    available = sum(read_shard_header(p) for p in val_files)
    span = cfg.tokens_per_pass(world)
    steps = min(cfg.val_tokens, available - 1) // span
    if steps == 0:
        raise ValueError(f"the val shards hold {available} tokens, fewer than one "
                         f"evaluation batch of {span}; lower --micro-batch or --seq-len")
    return steps


@torch.no_grad()
def evaluate(model: nn.Module, stream: TokenStream, steps: int, world: int,
             device: torch.device, autocast) -> float:
    """Mean loss over the same first `steps` batches of the val stream every time."""
    stream.load_state({"shard_index": 0, "position": 0})
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = stream.next_batch(device)
        with autocast:
            total += model(x, y).float()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.item() / (steps * world)


# ----------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass
class RunState:
    """The run's bookkeeping: what a checkpoint saves besides the model, the optimizer and the
    RNG, and what the summary reports."""
    step: int = 0                  # optimizer steps taken, every one inside train_time
    train_time: float = 0.0        # seconds of training steps (no evaluation, no compile)
    optimizer_time: float = 0.0    # of train_time, in optimizer.step()
    reached: dict | None = None    # {"step", "train_time_s"} where val loss first hit target
    stream: dict | None = None     # the training stream's position
    train_loss: float | None = None
    val_loss: float | None = None

    @classmethod
    def from_saved(cls, saved: dict) -> "RunState":
        """From a checkpoint's "run", keeping the fields this version has (earlier ones also
        saved counted_steps, now always equal to step)."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return self.step * tokens_per_step / max(self.train_time, 1e-9)


# whole (unsharded) tensors on CPU, so one file serves any world size and parallelism
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(path: Path, model: nn.Module, optimizer, run: RunState, cfg: Config,
                    rank: int) -> None:
    """Every rank takes part in gathering the state; rank 0 writes it to a temporary file,
    then renames it: a crash never leaves half a checkpoint."""
    state = {"model": get_model_state_dict(model, options=FULL_STATE),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL_STATE),
             "run": dataclasses.asdict(run), "rng_cpu": torch.get_rng_state(),
             "config": dataclasses.asdict(cfg)}
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)


def read_checkpoint(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error}); "
                         f"it may be truncated (a job killed while writing it?). Resume from "
                         f"an earlier checkpoint_*.pt") from error
    if not isinstance(checkpoint, dict) or "run" not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint of this train_gpt.py (no run state; an "
                         f"older version wrote it?)")
    return checkpoint


MODEL_SHAPE = ("vocab_size", "n_layer", "n_head", "dim")   # what a checkpoint must match


def check_resumable(checkpoint: dict, cfg: Config, path: Path) -> None:
    """Refuse, before any work, a checkpoint of a model of another shape."""
    saved = checkpoint["config"]
    different = [f"{name} {saved.get(name)} there, {getattr(cfg, name)} here"
                 for name in MODEL_SHAPE if saved.get(name) != getattr(cfg, name)]
    if different:
        raise ValueError(f"{path}: a checkpoint of another model ({'; '.join(different)}); "
                         f"resume with the --preset and flags it was trained with")


def load_checkpoint(checkpoint: dict, model: nn.Module, optimizer) -> RunState:
    """Restore model, optimizer and CPU RNG from a checkpoint; return the run's bookkeeping."""
    set_model_state_dict(model, checkpoint["model"], options=FULL_STATE)
    set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=FULL_STATE)
    torch.set_rng_state(checkpoint["rng_cpu"])
    return RunState.from_saved(checkpoint["run"])


def model_from_checkpoint(path: Path) -> tuple[GPT, Config, RunState]:
    """The model of a checkpoint (on CPU), its configuration and the run's state at saving."""
    checkpoint = read_checkpoint(path)
    cfg = Config(**checkpoint["config"])
    model = GPT(cfg)
    model.load_state_dict(checkpoint["model"])
    return model, cfg, RunState.from_saved(checkpoint["run"])


def find_checkpoint(path: Path) -> Path:
    if path.is_dir():
        candidates = sorted(path.glob("checkpoint_*.pt"))
        if not candidates:
            raise FileNotFoundError(f"--resume {path}: no checkpoint_*.pt in this folder")
        return candidates[-1]
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such file")
    return path


# ----------------------------------------------------------------------------- training loop

def print0(*values) -> None:
    """Print on rank 0 only, through tqdm so that the progress bar stays whole."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(map(str, values)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accumulation_steps(cfg: Config, world: int) -> int:
    per_pass = cfg.tokens_per_pass(world)
    if cfg.tokens_per_step % per_pass:
        raise ValueError(f"--tokens-per-step {cfg.tokens_per_step} is not a multiple of "
                         f"world size {world} x micro-batch {cfg.micro_batch} x seq-len "
                         f"{cfg.seq_len} = {per_pass}; change one of them")
    return cfg.tokens_per_step // per_pass


def train_step(model: nn.Module, wrapped: nn.Module, optimizer, stream: TokenStream,
               cfg: Config, step: int, accumulation: int, device: torch.device,
               autocast, stop_requested: bool = False) -> tuple[float, float, float, bool]:
    """Gradient accumulation over the micro-steps, then the update at this step's lr.
    Returns (train loss: the mean over micro-batches and ranks, seconds, of which in the
    optimizer, whether any rank was asked to stop)."""
    synchronize(device)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    for micro in range(accumulation):
        x, y = stream.next_batch(device)
        with gradient_sync(wrapped, micro == accumulation - 1), autocast:
            loss = model(x, y) / accumulation
        loss.backward()
        loss_sum += loss.detach()
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(step, cfg)
    synchronize(device)
    optimizer_start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    end = time.perf_counter()
    # one small all-reduce, off the clock: the mean loss, and whether any rank must stop
    shared = torch.stack([loss_sum.float(), torch.tensor(float(stop_requested), device=device)])
    if dist.is_initialized():
        dist.all_reduce(shared)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return shared[0].item() / world, end - start, end - optimizer_start, shared[1].item() > 0


class StopRequest:
    """Ctrl-C or SIGTERM (a preempted job) asks the run to stop: at the end of the current
    step every rank saves the checkpoint and exits cleanly; --resume continues from there."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def compile_warm_up(model: nn.Module, optimizer, stream: TokenStream, take_step) -> None:
    """Compile off the clock, as the speedruns do: take_step() once, then put the parameters,
    the optimizer state and the data position back as they were."""
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    position = stream.state()
    take_step()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), params):
            p.copy_(saved)
    optimizer.state.clear()
    optimizer.state.update(state)
    stream.load_state(position)


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """On CUDA, FSDP2's recommended policy: bf16 parameters for compute (all-gathers move half
    the bytes), gradients reduced in fp32. On CPU everything stays fp32."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def device_mesh(device: torch.device, world: int, replicas: int):
    """FSDP2's mesh: 1-D over all ranks, or for replicas > 1 HSDP's 2-D (replicas, ranks per
    replica): rows sharded within a replica group, the groups replicas of each other."""
    if replicas == 1:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (replicas, world // replicas),
                            mesh_dim_names=("replicate", "shard"))


def check_layout(args, world: int) -> None:
    if args.replicas < 1 or world % args.replicas:
        raise ValueError(f"--replicas {args.replicas} must divide the number of ranks {world} "
                         f"(use the number of nodes: each node's ranks form a replica group)")
    if args.replicas > 1 and args.parallel != "fsdp":
        raise ValueError(f"--replicas {args.replicas} is HSDP, a layout of FSDP2: it needs "
                         f"--parallel fsdp, not {args.parallel}")


def train(args, rank: int, world: int, device: torch.device) -> dict:
    check_layout(args, world)
    cfg = resolve_config(args, device)
    checkpoint_path = find_checkpoint(args.resume) if args.resume else None
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint:
        check_resumable(checkpoint, cfg, checkpoint_path)
    accumulation = accumulation_steps(cfg, world)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    train_files, val_files = prepare_data(cfg, args.data_dir, rank, world)
    val_steps = evaluation_steps(cfg, val_files, world)
    val_stream = TokenStream(val_files, cfg.micro_batch, cfg.seq_len, rank, world,
                             cfg.vocab_size)
    stream = TokenStream(train_files, cfg.micro_batch, cfg.seq_len, rank, world, cfg.vocab_size)

    # -- model and optimizer
    torch.manual_seed(args.seed)
    raw_model = GPT(cfg).to(device)
    sharded = world > 1 and args.parallel == "fsdp"
    if sharded:   # every block, then the rest (embeddings, head): rows split over ranks
        mesh, policy = device_mesh(device, world, args.replicas), mixed_precision(device)
        for block in raw_model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(raw_model, mesh=mesh, mp_policy=policy)
    wrapped = DistributedDataParallel(raw_model) if world > 1 and not sharded else raw_model
    optimizer = build_optimizer(raw_model, cfg, args.optimizer, sharded, use_compile,
                                args.cautious_wd, args.split_qkv, args.orthogonalizer)
    model = torch.compile(wrapped) if use_compile else wrapped

    run, resumed_at = RunState(), None
    if checkpoint:
        run = load_checkpoint(checkpoint, raw_model, optimizer)
        del checkpoint
        stream.load_state(run.stream)
        resumed_at = run.step   # the run that saved it evaluated this step, then saved
        print0(f"resumed from {checkpoint_path} at step {run.step}")
    n_params = sum(p.numel() for p in raw_model.parameters())
    parallel = f"{world} ranks ({args.parallel})" if world > 1 else "1 rank"
    if args.replicas > 1:
        parallel = f"{world} ranks (HSDP: {args.replicas} replicas x {world // args.replicas})"
    print0(f"{n_params / 1e6:.2f}M parameters, {parallel} on {device}, "
           f"{cfg.tokens_per_step} tokens/step ({accumulation} accumulation step(s)), "
           f"optimizer {args.optimizer}{', cautious wd' if args.cautious_wd else ''}"
           f"{f', qkv split {args.split_qkv}' if args.split_qkv != 'none' else ''}"
           f"{f', {args.orthogonalizer}' if args.orthogonalizer != 'newton_schulz' else ''}, "
           f"compile {use_compile}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = open(args.out_dir / "log.jsonl", "a") if rank == 0 else None

    def log_line(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    stop_at = min(args.stop_at_step or cfg.max_steps, cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=rank != 0, dynamic_ncols=True,
               mininterval=1.0)
    step_once = functools.partial(train_step, model=model, wrapped=wrapped, optimizer=optimizer,
                                  stream=stream, cfg=cfg, accumulation=accumulation,
                                  device=device, autocast=autocast)
    if use_compile and run.step < stop_at:
        compile_warm_up(raw_model, optimizer, stream, functools.partial(step_once, step=run.step))
    stop = StopRequest()
    interrupted = False
    try:
        while True:
            if run.step != resumed_at:   # (a resumed run's first step was done before saving)
                # -- evaluate (off the clock), then checkpoint: a checkpoint holds its step's
                # val loss and whether the target was reached there
                if run.step % cfg.val_every == 0 or run.step == stop_at:
                    run.val_loss = evaluate(model, val_stream, val_steps, world, device, autocast)
                    if run.reached is None and run.val_loss <= cfg.target_val_loss:
                        run.reached = {"step": run.step, "train_time_s": run.train_time}
                    print0(f"step {run.step}/{cfg.max_steps} val loss {run.val_loss:.4f} "
                           f"train time {run.train_time:.1f}s")
                    log_line({"kind": "val", "step": run.step, "val_loss": run.val_loss,
                              "train_loss": run.train_loss, "train_time_s": run.train_time})
                periodic = args.save_every and run.step % args.save_every == 0
                stopping_early = run.step == stop_at < cfg.max_steps
                if run.step > 0 and (periodic or interrupted or stopping_early):
                    run.stream = stream.state()
                    save_checkpoint(args.out_dir / f"checkpoint_{run.step:06d}.pt", raw_model,
                                    optimizer, run, cfg, rank)
                    if dist.is_initialized():
                        dist.barrier()
            if run.step == stop_at or interrupted:
                break
            # -- step
            run.train_loss, seconds, optimizer_seconds, interrupted = step_once(
                step=run.step, stop_requested=stop.requested)
            run.train_time += seconds
            run.optimizer_time += optimizer_seconds
            run.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{run.train_loss:.3f}",
                            tok_s=f"{run.tokens_per_s(cfg.tokens_per_step):.0f}", refresh=False)
    finally:
        stop.restore()
    if interrupted:
        print0(f"stopped by a signal at step {run.step}: checkpoint saved; continue with "
               f"--resume {args.out_dir}")
    bar.close()

    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"kind": "summary", "steps": run.step, "finished": run.step == cfg.max_steps,
               "interrupted": interrupted,
               "val_loss": run.val_loss, "train_time_s": run.train_time,
               "tokens_per_s": run.tokens_per_s(cfg.tokens_per_step),
               "optimizer_time_s": run.optimizer_time,
               "optimizer_share": run.optimizer_time / max(run.train_time, 1e-9),
               "target_val_loss": cfg.target_val_loss,
               "target_reached_step": run.reached and run.reached["step"],
               "target_reached_time_s": run.reached and run.reached["train_time_s"],
               "peak_memory_mib": peak_mib, "optimizer": args.optimizer, "world_size": world,
               "parallel": args.parallel if world > 1 else None, "replicas": args.replicas,
               "device": str(device), "config": dataclasses.asdict(cfg)}
    log_line(summary)
    if log:
        log.close()
    print0(f"done: {run.step} steps, val loss {run.val_loss:.4f}, "
           f"{summary['tokens_per_s']:.0f} tokens/s, target {cfg.target_val_loss} reached at "
           f"step {summary['target_reached_step']}")
    return summary


def main(argv=None) -> dict:
    """Set up the process group (under torchrun), train, tear the group down."""
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            # the sharded model and optimizer hold the group through the device mesh: free
            # them first, or the group is torn down at interpreter exit, where gloo can abort
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
