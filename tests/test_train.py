"""GenPI training end to end on the tiny model: every loss option, overfitting, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CONF, compose_cfg

LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
REPO = CONF.parent



def run_train(tmp_path: Path, overrides: list[str]):
    from genpi.train import train

    cfg = compose_cfg("train", overrides, tmp_path)
    return train(cfg)


@pytest.mark.parametrize("loss", LOSSES)
def test_fast_dev_run_every_loss(tmp_path, tiny_path, loss):
    out = run_train(tmp_path, [f"loss={loss}", "debug=fdr"])
    assert out["trainer"].global_step == 1
    module = out["module"]
    assert set(module.weights) == {"kl", "sft", "pg"}


def test_overfit_halves_val_kl(tmp_path, tiny_path):
    out = run_train(tmp_path, ["loss=kl", "debug=overfit", "trainer.max_epochs=20"])
    m = out["metrics"]
    assert m["val/kl"] <= 0.5 * m["val/kl_start"], m
    saved = json.loads((out["run_dir"] / "metrics.json").read_text())
    assert saved["val/kl"] == pytest.approx(m["val/kl"])
    assert (out["run_dir"] / "adapter" / "adapter_config.json").is_file()


def test_checkpoint_holds_adapter_and_optimizer_not_base(tmp_path, tiny_path):
    import torch

    out = run_train(tmp_path, ["loss=genpi", "trainer.max_epochs=1", "data.max_records=24"])
    ckpt = torch.load(out["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"]
    n_params = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_params < 0.5 * sum(p.numel() for p in out["module"].model.parameters())


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genpi.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_bad_input_gives_one_clear_line(tmp_path, tiny_path):
    root = f"paths.output_root={tmp_path}"
    typo = _cli([root, "loss=genpi_typo"], REPO)
    assert typo.returncode != 0 and "genpi_kl" in typo.stderr  # Hydra lists the valid options
    missing = _cli([root, "debug=fdr", f"data.path={tmp_path}/none.jsonl"], REPO)
    assert missing.returncode == 2
    assert "dataset not found" in missing.stderr and "Traceback" not in missing.stderr
    nomodel = _cli([root, "debug=fdr", "model.name_or_path=./no/such/model"], REPO)
    assert nomodel.returncode == 2 and "no/such/model" in nomodel.stderr and "Traceback" not in nomodel.stderr


@pytest.mark.parametrize("value", ["outputs/multirun/x/os-sft-tiny-s0__data.max_records=48,trainer.max_epochs=1",
                                   "/tmp/it's here/a\\b", "plain"])
def test_post_eval_quotes_run_folders_for_hydra(value):
    """Sweep folder names hold '=' and ',': the evaluation after training must get the folder back unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from genpi.train import _quoted

    assert OverridesParser.create().parse_override(f"run_dir={_quoted(value)}").value() == value
