"""Shared test helpers: compose a genpi config the way the entry points do."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

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
