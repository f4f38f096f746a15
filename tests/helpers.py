"""Shared test helpers: compose a genpi config the way the entry points do."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import genpi.utils.hydra_utils  # noqa: F401  (registers the genpi_* resolvers the configs use)

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_cfg(config_name: str, overrides: list[str], output_root: Path):
    """Compose ``conf/<config_name>.yaml`` with Hydra's runtime set, so ``${hydra:...}`` resolves.

    The run folder is ``hydra.run.dir`` under ``output_root``, as a real launch would make it.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=[f"paths.output_root={output_root}", *overrides],
                      return_hydra_config=True)
    run_dir = Path(cfg.hydra.run.dir)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.override_dirname = ""
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def run_bad(capsys, tmp_path: Path, config: str, entry, overrides: list[str]):
    """Run ``entry`` (a command's function) through the wrapper its command runs, on a config composed in
    ``tmp_path / "out"``, expecting it to exit: ``(exit code, non-empty stderr lines, stderr, run folder)``."""
    import pytest

    from genpi.utils.wrappers import task_wrapper

    cfg = compose_cfg(config, overrides, tmp_path / "out")
    run_dir = Path(cfg.hydra.run.dir)
    with pytest.raises(SystemExit) as info:
        task_wrapper(entry)(cfg)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return info.value.code, lines, err, run_dir


def vllm_env() -> dict[str, str]:
    """The environment genpi gives its own vLLM processes on this machine (one engine process, a KV cache that fits,
    no torch.compile without a GPU, this checkout on ``PYTHONPATH``), for the tests' own vLLM scripts and servers."""
    from genpi.evaluation.generation import vllm_subprocess_env

    return vllm_subprocess_env(kvcache_gb=1, multiprocessing=False)


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``), as wandb writes them offline.

    wandb >= 0.2x no longer ships a Python reader, so this reads the format itself: a 7-byte header
    (``:W&B``, a 2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 4-byte CRC, a
    2-byte little-endian length and a type byte (1 full, 2 first, 3 middle, 4 last); block tails shorter
    than a chunk header are zero padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            break
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            records.append(rec)
    return records


def wait_for_wandb_records(path: Path, kinds: tuple[str, ...] = ("run",), timeout_s: float = 120.0) -> list:
    """The records of a W&B offline log once it holds a record of each of ``kinds``: wandb's service process writes
    the log after the run's own process has moved on, later still on a busy machine."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_wandb_records(path)
        except (AssertionError, ValueError, IndexError):  # caught mid-write
            records = []
        if set(kinds) <= {r.WhichOneof("record_type") for r in records} or time.monotonic() > deadline:
            return records
        time.sleep(0.5)
