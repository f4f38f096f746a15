"""Results of a synth or eval job sent to the configured loggers (CSV, TensorBoard, W&B).

Training logs through Lightning as it runs; synthesis and evaluation are not Lightning jobs, so they report once,
at the end, through the same logger configs (``conf/logger/``): on W&B in the same group as the training runs
(``logger.wandb.group`` = the sweep or experiment name), with their own ``job_type``, and with tables and images
next to the numbers. The API key is wandb's business: it reads ``WANDB_API_KEY`` from the environment; nothing
here writes it anywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from genpi.utils.hydra_utils import to_dict


def numeric_leaves(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """Finite numbers of a nested dict as ``prefix/a/b`` (None, strings, lists and booleans left out)."""
    flat: dict[str, float] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[key] = float(value)

    walk(prefix, values)
    return flat


def report_to_loggers(cfg: DictConfig, job_type: str, metrics: dict[str, float],
                      tables: dict[str, tuple[list[str], list[list[Any]]]] | None = None,
                      images: dict[str, Path] | None = None) -> None:
    """Send one job's results to every logger of ``cfg.logger``.

    Args:
        job_type: the W&B job type (``synth`` or ``eval``).
        metrics: flat ``name -> number``, logged at step 0.
        tables: ``key -> (columns, rows)``, logged as W&B tables (other loggers skip them).
        images: ``key -> PNG path``, logged as W&B images (other loggers skip them).
    """
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        if name == "wandb":
            with open_dict(lcfg):
                lcfg.job_type = job_type
                lcfg.id = None  # a new W&B run per job; the group ties it to its study
        logger = hydra.utils.instantiate(lcfg, _convert_="partial")
        # Hydra's own node is left out before resolving: it is not the job's config, and parts of it resolve
        # only inside a sweep.
        logger.log_hyperparams(to_dict(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
        logger.log_metrics(metrics, step=0)
        if name == "wandb":
            for key, (columns, rows) in (tables or {}).items():
                logger.log_table(key=key, columns=columns, data=rows)
            for key, png in (images or {}).items():
                logger.log_image(key=key, images=[str(png)], caption=[Path(png).stem])
        if hasattr(logger, "save"):
            logger.save()
        if hasattr(logger, "finalize"):
            logger.finalize("success")
        if name == "wandb":
            import wandb

            wandb.finish()
