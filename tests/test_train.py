"""GenPI training end to end on the tiny model: every loss option, overfitting, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

from tests.helpers import CONF, compose_cfg

LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
REPO = CONF.parent



def run_train(tmp_path: Path, overrides: list[str]):
    from genpi.train import train

    cfg = compose_cfg("train", overrides, tmp_path)
    return train(cfg)


@pytest.mark.parametrize("loss", LOSSES)
def test_fast_dev_run_every_loss(tmp_path, tiny_path, loss):
    out = run_train(tmp_path, [f"loss={loss}", "debug=fdr", "loss.kl.sampling.max_new_tokens=6"])
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
    """Through the command itself (the table of bad values runs in-process in tests/test_schema.py)."""
    root = f"paths.output_root={tmp_path}"
    typo = _cli([root, "loss=genpi_typo"], REPO)
    assert typo.returncode != 0 and "genpi_kl" in typo.stderr  # Hydra lists the valid options
    nomodel = _cli([root, "debug=fdr", "model.name_or_path=./no/such/model"], REPO)
    assert nomodel.returncode == 2 and "no/such/model" in nomodel.stderr and "Traceback" not in nomodel.stderr


@pytest.mark.parametrize("value", ["outputs/multirun/x/os-sft-tiny-s0__data.max_records=48,trainer.max_epochs=1",
                                   "/tmp/it's here/a\\b", "plain"])
def test_post_eval_quotes_run_folders_for_hydra(value):
    """Sweep folder names hold '=' and ',': the evaluation after training must get the folder back unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from genpi.train import _quoted

    assert OverridesParser.create().parse_override(f"run_dir={_quoted(value)}").value() == value


# --- on-policy distillation (issue 13) ---
FAST_SAMPLING = ["loss.kl.sampling.max_new_tokens=6"]


@pytest.mark.parametrize("overrides", [
    ["loss=opcd", "loss.sft.weight=0.7"],
    ["loss=opcd", "loss.pg.weight=0.3"],
    ["loss=opcd", "loss.sft.weight=0.7", "loss.pg.weight=0.3", "loss.kl.kind=jsd", "loss.kl.beta=0.5"],
    ["loss=genpi_kl", "loss.kl.on_policy=true", "loss.kl.lmbda=0.5", "loss.kl.sampling.top_p=0.9",
     "loss.kl.sampling.temperature=0"],
], ids=["opcd+sft", "opcd+pg", "opcd+sft+pg_jsd", "genpi_kl_mixed_greedy"])
def test_fast_dev_run_on_policy_with_sft_and_pg(tmp_path, tiny_path, overrides):
    out = run_train(tmp_path, [*overrides, *FAST_SAMPLING, "debug=fdr"])
    assert out["trainer"].global_step == 1
    logged = out["trainer"].logged_metrics
    for term in ("sft", "pg"):
        assert (f"train/{term}" in logged) == (out["module"].weights[term] > 0)
    if float(logged["train/opcd_on_policy"]):
        assert {"train/opcd_sample_s", "train/opcd_score_s", "train/opcd_backward_s", "train/opcd_sampled_len",
                "train/opcd_reverse_kl"} <= set(logged)
        assert 1 <= float(logged["train/opcd_sampled_len"]) <= 6


class StopAfterFirstEpoch(pl.Callback):
    """Stands in for a run killed after its first checkpoint (the epoch-end validation)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resumed_on_policy_run_samples_the_same_tokens(tmp_path, tiny_path, monkeypatch):
    """Two runs of two epochs, one stopped after the first and resumed from its checkpoint: the resumed half draws
    the same batches on-policy and samples the same tokens as the run that never stopped."""
    from genpi.onpolicy import OnPolicySampler

    draws: list = []
    real_sample = OnPolicySampler.sample
    monkeypatch.setattr(OnPolicySampler, "sample",
                        lambda self, model, prompts, seed: draws.append((seed, real_sample(self, model, prompts, seed)))
                        or draws[-1][1])
    common = ["loss=opcd", "loss.kl.lmbda=0.7", *FAST_SAMPLING, "trainer.max_epochs=2", "data.max_records=12",
              "data.batch_size=4", "data.val_size=2", "data.test_size=2", "validate_before_fit=false",
              "model.lora.dropout=0.0", "optim.warmup_ratio=0.0"]
    run_train(tmp_path / "whole", common)
    whole, draws[:] = list(draws), []
    stop = f"+callbacks.stop._target_={__name__}.StopAfterFirstEpoch"
    killed = run_train(tmp_path / "killed", [*common, stop])
    first_half, draws[:] = list(draws), []
    assert (killed["run_dir"] / "checkpoints" / "last.ckpt").is_file()
    run_train(tmp_path / "killed", common)  # the same command again: resumes from last.ckpt
    assert first_half + draws == whole
    assert draws and draws != first_half[: len(draws)]  # the generator went on; it did not start over from the seed
