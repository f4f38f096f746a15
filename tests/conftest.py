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

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test`) each worker takes one core, and the commands tests start inherit one thread;
# alone, the session uses both.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

def pytest_collection_modifyitems(config, items):
    """Files with vLLM tests first, then files with slow tests, then the rest (stable within each): under
    pytest-xdist (whole files per worker) the longest files start first instead of leaving one worker alone at
    the end."""
    weight: dict[str, int] = {}
    for item in items:
        path = str(item.path)
        rank = 0 if item.get_closest_marker("vllm") else 1 if item.get_closest_marker("slow") else 2
        weight[path] = min(weight.get(path, 2), rank)
    items.sort(key=lambda item: weight[str(item.path)])


TINY_CFG = {"name_or_path": "tiny"}
# The real-tokenizer models the tests pair with tiny random weights (genpi/models/real_vocab.py).
REAL_VOCAB_FAMILIES = ["tiny_llama3_vocab", "tiny_chatml", "tiny_mistral_vocab"]


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


# -- real-tokenizer models (tests/test_real_tokenizers*.py) ----------------------------------------------
@pytest.fixture(scope="session")
def real_tokenizers():
    """``{family: tokenizer}`` through the factory (the model folder is built on first use, then cached)."""
    from genpi.models.factory import load_tokenizer

    return {name: load_tokenizer({"name_or_path": name}) for name in REAL_VOCAB_FAMILIES}


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """``trained_runs(name)``: a 2-step KL run of that model, whose adapter moved (a high learning rate), for
    evaluation and export; trained on first use, once per session (shared by the two real-tokenizer test modules)."""
    from genpi.train import train
    from tests.helpers import compose_cfg

    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = train(compose_cfg("train", [f"model={name}", "loss=kl", "trainer.max_steps=2", "trainer.max_epochs=1",
                                              "data.max_records=24", "data.batch_size=4", "optim.lr=5e-2",
                                              "validate_before_fit=false", "logger=csv"],
                                    tmp_path_factory.mktemp(f"train-{name}")))
            runs[name] = Path(out["run_dir"])
        return runs[name]

    return get
