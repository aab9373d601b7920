"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest

from cpu_torchvision import define_missing_ops

define_missing_ops()   # before any test module imports transformers or timm


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The default stdlib corpus, built once per test session into shards of 2M bytes."""
    from train_gpt import build_stdlib_corpus
    data_dir = tmp_path_factory.mktemp("stdlib")
    build_stdlib_corpus(data_dir, shard_tokens=2_000_000)
    return data_dir
