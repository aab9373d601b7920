"""Fixtures shared by the test modules, and the --heavy option."""
from pathlib import Path

import pytest

from cpu_torchvision import define_missing_ops

define_missing_ops()   # before any test module imports transformers or timm


def pytest_addoption(parser):
    parser.addoption("--heavy", action="store_true",
                     help="also run the tests marked heavy (minutes each on 2 CPU cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--heavy"):
        return
    skip = pytest.mark.skip(reason="heavy: minutes on a CPU; run with --heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The default stdlib corpus, built once per test session into shards of 2M bytes."""
    from train_gpt import build_stdlib_corpus
    data_dir = tmp_path_factory.mktemp("stdlib")
    build_stdlib_corpus(data_dir, shard_tokens=2_000_000)
    return data_dir
