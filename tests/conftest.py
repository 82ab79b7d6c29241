import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

import minimind_o as mo  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts):
    """A file under ../shared, or a skip that says why (CI always has ../shared)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: the released tokenizer/voices live in ../shared beside the project")
    return path


def tiny_config(**kw):
    base = dict(hidden_size=64, num_hidden_layers=4, talker_hidden_size=64, num_talker_hidden_layers=2)
    base.update(kw)
    return mo.OmniConfig(**base)


@pytest.fixture(scope="session")
def tokenizer():
    return mo.load_tokenizer(shared_path("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer_flag():
    """train.py's --tokenizer for runs in the tests (a clone has none until it downloads the release's)."""
    return ["--tokenizer", shared_path("tokenizer")]
