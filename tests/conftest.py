"""Session-wide test settings and the tiny-model fixtures.

The tiny model is built once per session into the user's genpi cache (``$GENPI_CACHE``, else ``~/.cache/genpi``),
not into a temp folder: its folder name is a content hash of everything that decides its bytes, so reusing it is
as safe as rebuilding, and repeated test runs (and the CLI subprocesses tests start, which inherit the
environment) skip the few seconds of building. Set ``GENPI_CACHE`` to a scratch folder to test from a cold cache;
``tests/test_models.py`` also builds into temp folders to check building itself.
"""

from __future__ import annotations

import os

# Before anything imports wandb, vLLM, tokenizers or the hub client: they read these at import time.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's memory check fails here without it
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine starts in 3 s instead of 18 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings; 2 cores gain nothing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no internet here: fail fast instead of retrying the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY_CFG = {"name_or_path": "tiny"}


@pytest.fixture(scope="session")
def tiny_path():
    """The built-in tiny model's folder (built on first use, then reused across sessions)."""
    from genpi.models.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    """The tiny model's tokenizer, through the factory (chat template checked, right padding)."""
    from genpi.models.factory import load_tokenizer

    return load_tokenizer(TINY_CFG)


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    """The bare tiny model (no adapter), in eval mode. Shared by the session: do not modify it."""
    from genpi.models.factory import load_model

    return load_model(TINY_CFG, for_training=False).eval()
