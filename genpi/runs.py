"""Run-folder bookkeeping: resume points, W&B ids, metrics files, failure records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run folder's ``checkpoints/last.ckpt`` (what a killed or requeued run restarts from)."""
    p = run_dir / "checkpoints" / "last.ckpt"
    return p if p.is_file() else None


def wandb_run_id(run_dir: Path, identity_hash: str, launch: str | None = None) -> str:
    """The W&B run id of this run folder, kept in ``wandb_id.txt``: the config's identity hash, so the same config
    continues the same W&B run; in a multirun, with the sweep's launch token too (each sweep folder is new, and
    its runs must not append to another sweep's)."""
    p = run_dir / "wandb_id.txt"
    if p.is_file():
        return p.read_text().strip()
    run_dir.mkdir(parents=True, exist_ok=True)
    rid = f"{identity_hash}-{launch}" if launch else identity_hash
    p.write_text(rid + "\n")
    return rid


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path


def update_json(path: Path, **values: Any) -> dict[str, Any]:
    data = read_json(path)
    data.update(values)
    write_json(path, data)
    return data


# -- run identity ------------------------------------------------------------------------------------------------
# What a run's folder name and W&B id are made of: every resolved key that can change its results, hashed. Left
# out are the keys that say where things go or how they are shown, never what is computed (the README lists them).
# A key ending in ".*" leaves out its whole block.
IDENTITY_EXCLUDED = (
    "hydra.*",             # Hydra's own settings: folders, launcher, sweeper, logging
    "paths.*",             # where runs are written
    "logger.*",            # where metrics are sent (csv, wandb, tensorboard)
    "callbacks.*",         # checkpoint files, progress bar, throughput timer
    "local.*",             # a machine's own settings (conf/local)
    "run_name", "sweep_name", "experiment_name", "tags",  # names: the folder is named from run_name already
    "ckpt_path", "resume",  # how a run starts, not what it computes
    "post_eval", "post_eval_overrides", "optimized_metric",  # what is measured after training, not the training
    "validate_before_fit",  # measures val/kl_start; trains the same
    "data.num_workers",    # loader processes: same batches
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "trainer.num_sanity_val_steps",
    "eval.show_examples",  # how many examples report.md shows
    "eval.vllm.timeout_s", "eval.vllm.multiprocessing", "eval.vllm.cpu_threads_bind", "eval.vllm.kvcache_gb",
    "synth.progress",
)
# Keys added after run identities were first hashed, with the default they were added with: at that default a key
# is left out of the hash, so runs made before it existed keep their folder (and resume) under the new code.
IDENTITY_ADDED_LATER: dict[str, Any] = {
    "data.drop_duplicates": False,
    "data.overfit": False,
    "eval.savings.prefix_caching": [False, True],
    # on-policy distillation (issue 13): runs from before it keep their hashes, and so their folders
    "loss.kl.on_policy": False,
    "loss.kl.lmbda": 1.0,
    "loss.kl.sampling.temperature": 1.0,
    "loss.kl.sampling.top_p": 1.0,
    "loss.kl.sampling.max_new_tokens": 128,
}
HASH_CHARS = 8


def _excluded(key: str, also: tuple[str, ...] = ()) -> bool:
    for rule in (*IDENTITY_EXCLUDED, *also):
        if rule.endswith(".*"):
            if key == rule[:-2] or key.startswith(rule[:-1]):
                return True
        elif key == rule:
            return True
    return False


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: tree}


def identity_keys(cfg: Any, also_excluded: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved leaves of a config (``DictConfig`` or dict) that decide a run's results, by dotted key.

    ``also_excluded`` leaves out more keys (same rules as ``IDENTITY_EXCLUDED``), those one entry point ignores.

    A value whose interpolation cannot be resolved here (it points into an excluded block that is not set yet, such
    as Hydra's runtime) is kept as its unresolved text, which is stable."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=False)
        flat = {}
        for key, value in _leaves(raw).items():
            if _excluded(key, also_excluded):
                continue
            if isinstance(value, str) and "${" in value:
                try:
                    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
                    if OmegaConf.is_config(value):
                        value = OmegaConf.to_container(value, resolve=True)
                except Exception:  # noqa: BLE001 - any resolution failure keeps the stable raw text
                    pass
            flat[key] = value
    else:
        flat = {k: v for k, v in _leaves(dict(cfg)).items() if not _excluded(k, also_excluded)}
    return {k: v for k, v in sorted(flat.items())
            if not (k in IDENTITY_ADDED_LATER and v == IDENTITY_ADDED_LATER[k])}


def config_hash(keys: dict[str, Any]) -> str:
    """A short hash of :func:`identity_keys` (8 hex characters)."""
    text = json.dumps(keys, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def differing_keys(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: stored -> current`` for every key whose value differs (a key absent on one side shows as unset)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<unset>"), current.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _hash_resolver(*also_excluded: str, _root_: Any) -> str:
    return config_hash(identity_keys(_root_, tuple(also_excluded)))


def register_resolvers() -> None:
    """``${genpi_config_hash:}``: the config's identity hash, for folder names in Hydra's ``run.dir``;
    ``${genpi_config_hash:seed,export.out_dir}`` leaves those keys out too (keys an entry point does not use)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("genpi_config_hash"):
        OmegaConf.register_new_resolver("genpi_config_hash", _hash_resolver)


register_resolvers()


def drop_rows_after_checkpoint(metrics_csv: Path, global_step: int) -> int:
    """Drop the rows of ``metrics.csv`` that a killed run logged after the checkpoint it resumes from; returns how
    many. The resumed run logs those steps again, so kept they would appear twice.

    Lightning's logger step is the number of optimizer steps done *before* the row's batch (the first batch logs
    step 0), so the first batch after a checkpoint taken at ``global_step`` logs ``step == global_step``: every
    row with ``step >= global_step`` came after the checkpoint; the rows of the validation the checkpoint was taken
    at (``global_step - 1``) are kept.
    """
    import csv

    if not metrics_csv.is_file():
        return 0
    with metrics_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < global_step]
    if len(kept) < len(rows):
        tmp = metrics_csv.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        tmp.replace(metrics_csv)
    return len(rows) - len(kept)


def _appending_writer_class():
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    class AppendingExperimentWriter(ExperimentWriter):
        """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it instead."""

        def _check_log_dir_exists(self) -> None:
            import csv

            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    return AppendingExperimentWriter


def _csv_logger_class():
    from lightning_fabric.loggers.logger import rank_zero_experiment
    from pytorch_lightning.loggers import CSVLogger

    class ResumableCSVLogger(CSVLogger):
        """A CSV logger whose ``metrics.csv`` survives a resume: rows are appended, never overwritten."""

        def drop_rows_after_checkpoint(self, global_step: int) -> int:
            """Before a resumed run logs: drop the rows logged after its checkpoint (see the module function)."""
            from pytorch_lightning.loggers.csv_logs import ExperimentWriter

            return drop_rows_after_checkpoint(Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE, global_step)

        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _appending_writer_class()(log_dir=self.log_dir)
            return self._experiment

    return ResumableCSVLogger


def ResumableCSVLogger(*args: Any, **kwargs: Any):  # noqa: N802 - used as a class by Hydra's _target_
    """:class:`pytorch_lightning.loggers.CSVLogger` whose ``metrics.csv`` is appended to on resume."""
    return _csv_logger_class()(*args, **kwargs)


def fit_seconds(train_log: Path) -> float:
    """The wall time a run spent fitting, from its ``train.log``: each "training <task> on ..." line of genpi.train
    to the ``Trainer.fit`` stop that follows it (or, for a fit ended by ``trainer.max_time``, Lightning's "Time limit
    reached" line: such a fit logs no stop), summed over the processes of a resumed run (a process killed before
    its fit stopped logs no stop: its time is not counted). The budget a study gives another run of the same data
    (``trainer.max_time``). Raises when the log holds no complete fit."""
    import re
    from datetime import datetime

    from genpi.utils.errors import GenpiError

    stamp = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[([^]]+)\]\[INFO\] (.*)$")
    total, start, fits = 0.0, None, 0
    for line in Path(train_log).read_text().splitlines():
        m = stamp.match(line)
        if not m:
            continue
        t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
        if m[2] == "genpi.train" and re.match(r"training \S+ on ", m[3]):
            start = t
        elif ("`Trainer.fit` stopped" in m[3] or m[3].startswith("Time limit reached")) and start is not None:
            total, start, fits = total + (t - start).total_seconds(), None, fits + 1
    if not fits:
        raise GenpiError(f"{train_log}: no complete fit (a 'training ... on' line of genpi.train and the "
                         "'Trainer.fit stopped' or 'Time limit reached' line after it)")
    return total
