"""Session fixtures: the tiny model is built once (into the user's genpi cache, keyed by content hash,
so repeated test runs reuse it) and shared by every test."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY_CFG = {"name_or_path": "tiny"}


@pytest.fixture(scope="session")
def tiny_path():
    from genpi.models.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from genpi.models.factory import load_tokenizer

    return load_tokenizer(TINY_CFG)


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    from genpi.models.factory import load_model

    return load_model(TINY_CFG, for_training=False)
