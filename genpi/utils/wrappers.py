"""Wrapping Hydra task functions: one-line errors, W&B closed between multirun jobs, failures recorded."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig

from genpi.utils.errors import GenpiError

log = logging.getLogger("genpi")


def run_dir_of(cfg: DictConfig) -> Path:
    """This run's folder: Hydra's output dir when Hydra runs us, else ``paths.output_dir`` as given."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def launch_id() -> str | None:
    """The multirun's launch token (in its sweep folder's name), or None for a single run."""
    import os

    return os.environ.get("GENPI_LAUNCH_ID") if _is_multirun() else None


def task_wrapper(fn):
    """Bad input prints one line and exits 2; any failure in a multirun job is written to the job's
    ``error.txt`` and the sweep goes on with the other jobs; W&B is always closed at the end."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        _mask_saved_config()
        try:
            return fn(cfg)
        except GenpiError as err:
            if _is_multirun():
                _record_failure(cfg, f"genpi: error: {err}")
                return None
            print(f"genpi: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception:
            if _is_multirun():
                _record_failure(cfg, traceback.format_exc())
                return None
            raise
        finally:
            _finish_wandb()

    return wrapper


def _mask_saved_config() -> None:
    """Hydra saves the config and the command line under ``<run folder>/.hydra/`` before genpi runs: credentials in
    URLs (``base_url=http://user:secret@host/v1``) are masked there too."""
    from hydra.core.hydra_config import HydraConfig

    from genpi.utils.redact import mask_url

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    folder = Path(hc.runtime.output_dir) / (hc.output_subdir or ".hydra") if hc.output_subdir else None
    if folder is None or not folder.is_dir():
        return
    for path in folder.glob("*.yaml"):
        text = path.read_text()
        masked = mask_url(text)
        if masked != text:
            path.write_text(masked)


def _record_failure(cfg: DictConfig, text: str) -> None:
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(text)
    log.error("job failed, the sweep goes on: %s (see %s)", text.strip().splitlines()[-1], run_dir / "error.txt")


def _finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
