"""Token shards of the speedrun format filled with random GPT-2-vocabulary tokens, for timing
train_gpt.py's gpt2 preset where FineWeb cannot be downloaded.

    python bench/synthetic_shards.py /tmp/synthetic --train-tokens 120_000_000

The tokens follow a Zipf law over the 50257 GPT-2 ids (as text roughly does), so the loss
falls a little and the logits are not uniform; the data is meaningless otherwise: use it for
throughput and memory, never for quality.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_gpt import write_shard  # noqa: E402

GPT2_VOCAB = 50257


def zipf_tokens(count: int, generator: torch.Generator) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, GPT2_VOCAB + 1, dtype=torch.float64)
    ids = torch.multinomial(weights.float(), count, replacement=True, generator=generator)
    return ids.to(torch.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-tokens", type=int, default=120_000_000)
    parser.add_argument("--val-tokens", type=int, default=2_000_000)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    write_shard(args.out_dir / "synthetic_val_000000.bin",
                zipf_tokens(args.val_tokens, generator))
    for index, start in enumerate(range(0, args.train_tokens, args.shard_tokens)):
        count = min(args.shard_tokens, args.train_tokens - start)
        write_shard(args.out_dir / f"synthetic_train_{index:06d}.bin",
                    zipf_tokens(count, generator))
    print(f"wrote {args.train_tokens} train and {args.val_tokens} val tokens to {args.out_dir}")


if __name__ == "__main__":
    main()
