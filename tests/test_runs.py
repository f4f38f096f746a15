"""Run identity: a run's folder follows from its config, so different configs never share one, the same config
resumes (history appended), debug runs stay apart, and a folder of another config is refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl

from genpi.runs import IDENTITY_ADDED_LATER, config_hash, differing_keys, identity_keys
from tests.helpers import compose_cfg

SMALL = ["trainer.max_epochs=1", "data.max_records=16", "data.batch_size=4", "data.val_size=4", "data.test_size=2",
         "validate_before_fit=true"]


class StopAfterFirstEpoch(pl.Callback):
    """Stands in for a run killed after its first checkpoint (the epoch-end validation)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def run_train(root: Path, overrides: list[str]):
    from genpi.train import train

    return train(compose_cfg("train", overrides, root))


def _exit_line(capsys, root: Path, overrides: list[str]) -> str:
    from genpi.train import train
    from genpi.utils.wrappers import task_wrapper

    with pytest.raises(SystemExit) as info:
        task_wrapper(train)(compose_cfg("train", overrides, root))
    assert info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# -- the hash ---------------------------------------------------------------------------------------------------
def test_identity_leaves_out_where_and_how_shown_and_keeps_what_changes_results(tmp_path):
    base = compose_cfg("train", [], tmp_path)
    keys = identity_keys(base)
    assert "optim.lr" in keys and "loss.kl.kind" in keys and "data.path" in keys and "seed" in keys
    assert not any(k.startswith(("paths.", "logger.", "hydra.", "callbacks.")) for k in keys)
    assert config_hash(keys) == config_hash(identity_keys(compose_cfg("train", [], tmp_path / "elsewhere")))
    same_results = compose_cfg("train", ["trainer.enable_progress_bar=false", "data.num_workers=2", "tags=[a]"],
                               tmp_path)
    assert config_hash(identity_keys(same_results)) == config_hash(keys)
    for override in ("optim.lr=1e-3", "loss.kl.kind=reverse_kl", "data.path=other.jsonl", "seed=1",
                     "trainer.accumulate_grad_batches=2"):
        other = identity_keys(compose_cfg("train", [override], tmp_path))
        assert config_hash(other) != config_hash(keys), override
        assert differing_keys(keys, other) and override.split("=")[0] in differing_keys(keys, other)[0]


def test_keys_added_later_at_their_default_keep_old_hashes(tmp_path):
    keys = identity_keys(compose_cfg("train", [], tmp_path))
    old = {k: v for k, v in keys.items() if k not in IDENTITY_ADDED_LATER}  # what a run before those keys stored
    assert config_hash(old) == config_hash(keys)
    changed = identity_keys(compose_cfg("train", ["data.drop_duplicates=true"], tmp_path))
    assert config_hash(changed) != config_hash(keys)


def test_folder_and_wandb_id_follow_from_the_config(tmp_path):
    a = compose_cfg("train", ["optim.lr=1e-3"], tmp_path)
    b = compose_cfg("train", ["optim.lr=2e-3"], tmp_path)
    dir_a, dir_b = Path(a.hydra.run.dir), Path(b.hydra.run.dir)
    assert dir_a != dir_b and dir_a.parent == dir_b.parent == tmp_path / "runs"
    assert dir_a.name == f"os-genpi-tiny-s0-{config_hash(identity_keys(a))}"
    assert Path(compose_cfg("train", ["optim.lr=1e-3"], tmp_path).hydra.run.dir) == dir_a
    debug = Path(compose_cfg("train", ["debug=fdr"], tmp_path).hydra.run.dir)
    assert debug.parent == tmp_path / "debug"
    from genpi.runs import wandb_run_id

    assert wandb_run_id(tmp_path / "w", "abcd1234") == "abcd1234" == wandb_run_id(tmp_path / "w", "other")
    assert wandb_run_id(tmp_path / "m", "abcd1234", "f00d") == "abcd1234-f00d"


# -- issue cases 1, 2 and 8 -----------------------------------------------------------------------------------------
def test_case1_different_configs_never_share_a_folder_and_a_changed_one_is_refused(tmp_path, tiny_path, capsys):
    first = run_train(tmp_path, SMALL)
    steps = first["metrics"]["train/steps"]
    assert steps > 0
    first_metrics = (first["run_dir"] / "metrics.json").read_text()
    second = run_train(tmp_path, [*SMALL, "optim.lr=1e-3"])
    assert second["run_dir"] != first["run_dir"]
    assert second["metrics"]["train/steps"] == steps  # trained from scratch, not "resumed" at the end of the first
    assert (first["run_dir"] / "metrics.json").read_text() == first_metrics  # the first run's numbers untouched
    run = json.loads((second["run_dir"] / "run.json").read_text())
    assert run["identity"]["keys"]["optim.lr"] == 1e-3 and second["metrics"]["run/config_hash"] == run["identity"]["hash"]

    # a folder whose stored config differs (here: edited by hand) is refused, naming the key; resume=force continues
    stored = json.loads((first["run_dir"] / "run.json").read_text())
    stored["identity"]["keys"]["loss.kl.kind"] = "reverse_kl"
    (first["run_dir"] / "run.json").write_text(json.dumps(stored))
    line = _exit_line(capsys, tmp_path, SMALL)
    assert "loss.kl.kind: reverse_kl -> forward_kl" in line and "resume=force" in line
    forced = run_train(tmp_path, [*SMALL, "resume=force"])
    assert forced["run_dir"] == first["run_dir"] and forced["metrics"]["train/steps"] == steps


def test_case2_a_debug_run_leaves_nothing_a_real_run_picks_up(tmp_path, tiny_path):
    smoke = run_train(tmp_path, ["debug=fdr"])
    assert smoke["run_dir"].parent == tmp_path / "debug"
    assert not (smoke["run_dir"] / "metrics.json").exists() and not (smoke["run_dir"] / "run.json").exists()
    real = run_train(tmp_path, SMALL)
    assert real["run_dir"].parent == tmp_path / "runs"
    assert real["metrics"]["train/steps"] == len(real["datamodule"].train_dataloader())


@pytest.mark.slow  # three training runs
def test_case8_resume_appends_history_and_keeps_one_config(tmp_path, tiny_path):
    common = [*SMALL, "trainer.max_epochs=2", "model.lora.dropout=0.0", "optim.warmup_ratio=0.0"]
    whole = run_train(tmp_path / "whole", common)
    stop = f"+callbacks.stop._target_={StopAfterFirstEpoch.__module__}.StopAfterFirstEpoch"
    killed = run_train(tmp_path / "killed", [*common, stop])
    assert (killed["run_dir"] / "checkpoints" / "last.ckpt").is_file()
    half = killed["metrics"]["train/steps"]
    assert 0 < half < whole["metrics"]["train/steps"]
    rows_before = list(csv.DictReader((killed["run_dir"] / "csv" / "metrics.csv").open()))

    resumed = run_train(tmp_path / "killed", common)  # the same command again (the stopper stood in for a kill)
    assert resumed["run_dir"] == killed["run_dir"]
    assert resumed["metrics"]["train/steps"] == whole["metrics"]["train/steps"]
    assert resumed["metrics"]["val/kl"] == pytest.approx(whole["metrics"]["val/kl"], rel=1e-4)
    assert resumed["metrics"]["val/kl_start"] == pytest.approx(killed["metrics"]["val/kl_start"])
    rows = list(csv.DictReader((resumed["run_dir"] / "csv" / "metrics.csv").open()))
    # what the killed run logged after its checkpoint (here its closing validation, at step `half`) is logged again
    # by the resumed run: dropped on resume, so each step's rows appear once, as in the run that was never stopped
    before_ckpt = [r for r in rows_before if int(r["step"]) < half]
    assert 0 < len(before_ckpt) < len(rows_before)
    assert rows[: len(before_ckpt)] == [{k: r.get(k, "") for k in rows[0]} for r in before_ckpt]  # kept, appended to
    steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert min(steps) < half <= max(steps)  # the history holds both halves of the training
    whole_rows = list(csv.DictReader((whole["run_dir"] / "csv" / "metrics.csv").open()))
    assert _row_shapes(rows) == _row_shapes(whole_rows)
    saved = json.loads((resumed["run_dir"] / "metrics.json").read_text())
    assert saved["run/config_hash"] == json.loads((resumed["run_dir"] / "run.json").read_text())["identity"]["hash"]


def _row_shapes(rows: list[dict[str, str]]) -> list[tuple]:
    """Each row's epoch, step and which metrics it holds (the values of a resumed run differ in the last digits)."""
    return [(r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v and k not in ("epoch", "step"))))
            for r in rows]


def test_metrics_rows_logged_after_the_checkpoint_are_dropped(tmp_path):
    from genpi.runs import drop_rows_after_checkpoint

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/kl\n0,0,,0.5\n0,0,1.0,\n0,1,0.9,\n0,1,,0.4\n1,2,0.8,\n1,3,0.7,\n")
    assert drop_rows_after_checkpoint(path, 2) == 2  # a checkpoint after 2 optimizer steps: steps 0 and 1 kept
    assert path.read_text().splitlines() == ["epoch,step,train/loss,val/kl", "0,0,,0.5", "0,0,1.0,", "0,1,0.9,",
                                             "0,1,,0.4"]
    assert drop_rows_after_checkpoint(path, 2) == 0 and drop_rows_after_checkpoint(tmp_path / "none.csv", 0) == 0


def test_checkpoint_of_another_lora_setup_is_refused(tmp_path, tiny_path, capsys):
    first = run_train(tmp_path, SMALL)
    ckpt = first["run_dir"] / "checkpoints" / "last.ckpt"
    line = _exit_line(capsys, tmp_path / "other", [*SMALL, "model.lora.r=4", f"ckpt_path={ckpt}"])
    assert "another setup" in line and "model.lora" in line


def test_fit_seconds_sums_the_fits_of_a_resumed_run_and_refuses_a_log_without_one(tmp_path):
    from genpi.runs import fit_seconds
    from genpi.utils.errors import GenpiError

    log = tmp_path / "train.log"
    log.write_text(
        "[2026-11-30 08:19:40,000][genpi.train][INFO] training os on data (20 train / 2 val records)\n"
        "[2026-11-30 08:19:50,500][genpi.train][INFO] training step 3 of 9\n"  # not a start
        "[2026-11-30 08:20:52,000][pytorch_lightning.utilities.rank_zero][INFO] `Trainer.fit` stopped: max_time\n"
        "[2026-11-30 08:43:40,000][genpi.train][INFO] training os on data (20 train / 2 val records)\n"  # resumed
        "[2026-11-30 08:43:50,250][pytorch_lightning.utilities.rank_zero][INFO] `Trainer.fit` stopped: max_epochs\n"
        "[2026-11-30 09:00:00,000][genpi.train][INFO] training os on data (killed: no stop follows)\n"
        "[2026-11-30 09:10:00,000][genpi.train][INFO] training os on data (resumed again, held to max_time)\n"
        "[2026-11-30 09:12:13,500][pytorch_lightning.utilities.rank_zero][INFO] Time limit reached. Elapsed time is "
        "0:02:13. Signaling Trainer to stop.\n")
    assert fit_seconds(log) == pytest.approx(72.0 + 10.25 + 133.5)
    log.write_text("[2026-11-30 08:19:40,000][genpi.train][INFO] training os on data\n")
    with pytest.raises(GenpiError, match="no complete fit"):
        fit_seconds(log)
