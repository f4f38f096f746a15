"""genpi-synth: synthesize a GenPI dataset (``python -m genpi.synth``).

Stages: pseudo inputs -> teacher and student answers -> reasons -> role-swapped conversations
[-> teacher top-k log-probs]; see :mod:`genpi.synthesis.plan` and :mod:`genpi.synthesis.stages`. The dataset folder holds
``data.jsonl`` (what ``genpi.data.records.load_records`` reads), ``card.json``, ``README.md`` and
``store/`` (the resumable shards).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from genpi import schema
from genpi.data.records import write_jsonl
from genpi.synthesis.card import build_card, print_summary, token_counter, write_card
from genpi.synthesis.clients import ClientPool
from genpi.synthesis.plan import REQUIRES, STAGES, Plan, make_plan
from genpi.synthesis.stages import Row, collect, owned_by, run_stages, source_rows
from genpi.synthesis.store import Store, now, shard_of, stable_hash
from genpi.tasks import build_task
from genpi.tasks.base import Task
from genpi.utils.errors import GenpiError
from genpi.utils.hydra_utils import to_dict
from genpi.utils.redact import mask_tree
from genpi.utils.tracking import numeric_leaves, report_to_loggers
from genpi.utils.wrappers import task_wrapper

log = logging.getLogger("genpi.synth")


def assemble(task: Task, rows: list[Row]) -> list[dict[str, Any]]:
    """Rows -> training records: the seven columns (empty where a stage did not run), a stable
    ``record_id`` (hash of the record's ids in every stage), and the teacher's top-k when every row has it."""
    with_topk = bool(rows) and all("teacher_topk_ids" in r for r in rows)
    records = []
    for row in rows:
        rec: dict[str, Any] = {
            "context_id": task.prompt_id,
            "context": task.prompt_text,
            "pseudo_input": row["pseudo_input"],
            "teacher_output_single": row.get("teacher_output_single") or "",
            "student_output_single": row.get("student_output_single") or "",
            "reason": row.get("reason") or "",
            "teacher_output_conv": row.get("teacher_output_conv") or [],
            "record_id": stable_hash(sorted(row["ids"].items())),
        }
        if with_topk:
            rec["teacher_topk_ids"] = row["teacher_topk_ids"]
            rec["teacher_topk_logprobs"] = row["teacher_topk_logprobs"]
        records.append(rec)
    return records


def plan_from_cfg(cfg: DictConfig | dict[str, Any]) -> Plan:
    """Build the task and check the run's plan (stages, prerequisites, clients, sampling, shards) before any
    model loads."""
    task_cfg = to_dict(cfg["task"])
    task = build_task(**task_cfg)
    return make_plan(task, to_dict(cfg["synth"]), to_dict(cfg["model"]), seed=int(cfg.get("seed") or 0))


@dataclass
class SynthResult:
    """What one ``genpi-synth`` process did: whether it assembled the dataset, or which shards it left to finish."""

    out_dir: Path
    merged: bool
    pending: list[int] = field(default_factory=list)


def run_synthesis(cfg: DictConfig | dict[str, Any]) -> Path:
    """Run the configured stages and write the dataset folder; returns that folder (``synth.out_dir``).

    ``cfg`` needs ``task``, ``model``, ``synth`` and optionally ``seed`` (the layout of ``conf/synth.yaml``).
    A rerun with the same config resumes from the store; a :class:`GenpiError` is raised at load time for
    bad settings and at the end of a stage that yields nothing. With ``synth.num_shards > 1`` the folder's
    ``data.jsonl`` is written by the last shard to finish (see :func:`synthesize`).
    """
    return synthesize(cfg).out_dir


def synthesize(cfg: DictConfig | dict[str, Any]) -> SynthResult:
    """One shard's work (the whole dataset when unsharded), then the merge if every shard is done.

    Shard ``i`` of ``K`` computes the records it owns (:func:`genpi.synthesis.stages.owned_by`) into its own
    store files, under its own lock; its status (running, done with counts and times, failed with the error)
    goes to ``store/shards/``. The shard that finds every shard done writes ``data.jsonl`` and ``card.json``
    from every shard's records, in the pseudo-input order of an unsharded run. ``synth.merge_only=true``
    computes nothing and merges, or names each shard that is not done with the command that reruns it.
    ``synth.data_parallel_size=D`` runs D engine processes in this job (shards ``i*D .. i*D+D-1`` of ``K*D``).
    """
    global _JOB_COMMAND
    if isinstance(cfg, DictConfig):
        schema.check(cfg, "synth")  # every key typed and in range before any model loads
    plan = plan_from_cfg(cfg)
    shards = plan.shards
    if shards.data_parallel_size > 1:
        if not shards.merge_only:
            return run_engines(cfg, plan)
        # The engines' work was filed as shards of num_shards x data_parallel_size; merge those.
        saved, _JOB_COMMAND = _JOB_COMMAND, (_job_overrides()[0], shards.data_parallel_size)
        plan.shards = dataclasses.replace(shards, num_shards=shards.num_shards * shards.data_parallel_size,
                                          data_parallel_size=1)
        try:
            return synthesize_plan(cfg, plan)
        finally:
            _JOB_COMMAND = saved
    return synthesize_plan(cfg, plan)


def synthesize_plan(cfg: DictConfig | dict[str, Any], plan: Plan) -> SynthResult:
    """:func:`synthesize` for a checked plan, in this process."""
    shards = plan.shards
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "store", shards.shard, shards.num_shards)
    if shards.merge_only:
        with store.critical():
            statuses = store.statuses(plan.run_key)
            _refuse_unfinished(plan, statuses, out)
            rows, _ = source_rows(plan, store, None, {})
            card = merge(cfg, plan, store, rows, statuses)
        return _finish(cfg, plan, card)
    log.info("synthesizing %s into %s (stages %s, inputs from %s, %s)", plan.task.name, out, plan.requested,
             plan.source, store.label)
    with store:
        started = now()
        status = {"state": "running", "started": started, "command": rerun_command(shards.shard)}
        store.write_status(plan.run_key, status)
        clients = ClientPool(plan.client_settings, seed=plan.seed)
        try:
            rows, reports = run_stages(plan, store, clients)
        except Exception as err:
            store.write_status(plan.run_key, {**status, "state": "failed", "failed": now(),
                                              "error": str(err).strip().splitlines()[-1] if str(err).strip()
                                              else type(err).__name__})
            raise
        finally:
            clients.close()
        finished = now()
        own = sum(1 for r in rows if owned_by(plan, r))
        with store.critical():
            store.write_status(plan.run_key, {**status, "state": "done", "finished": finished,
                                              "seconds": finished - started, "records": own, "stages": reports})
            statuses = store.statuses(plan.run_key)
            pending = [i for i in range(shards.num_shards) if statuses.get(i, {}).get("state") != "done"]
            if pending:
                log.info("%s done (%d records); waiting for shards %s: the last to finish writes %s, or run %s",
                         store.label, own, pending, out / "data.jsonl", merge_command())
                return SynthResult(out, False, pending)
            card = merge(cfg, plan, store, rows, statuses)
    return _finish(cfg, plan, card)


def _finish(cfg: DictConfig | dict[str, Any], plan: Plan, card: dict[str, Any]) -> SynthResult:
    for col in card["empty_columns"]:
        log.warning("column %s is empty in %s: run its stage to fill it", col, plan.out_dir / "data.jsonl")
    if plan.progress:
        print_summary(card)
    if isinstance(cfg, DictConfig) and cfg.get("logger"):
        report_card(cfg, card)
    return SynthResult(plan.out_dir, True)


def merge(cfg: DictConfig | dict[str, Any], plan: Plan, store: Store, rows: list[Row],
          statuses: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``data.jsonl`` and the card from every shard's records (call under ``store.critical()``, every shard done).

    Refuses, naming the shards that own them, when a requested stage's records are missing for some rows
    (a store file deleted since): nothing is written then.
    """
    rows, found = collect(plan, store, rows)
    for stage in plan.requested:
        if stage == "pseudo_inputs":
            continue
        missing = [r for r in rows if stage not in r["ids"] and REQUIRES[stage] in r["ids"]]
        if missing:
            owners = sorted({shard_of(r["ids"]["pseudo_inputs"], plan.shards.num_shards) for r in missing})
            raise GenpiError(
                f"stage {stage!r} lacks {len(missing)} of {len(rows)} records in {store.root}, owned by shards "
                f"{owners}: rerun " + "; ".join(f"`{rerun_command(i)}`" for i in owners)
            )
    records = assemble(plan.task, rows)
    write_jsonl(records, plan.out_dir / "data.jsonl")
    count, unit = token_counter(plan.run_model)
    config = {"task": plan.task.describe(), "model": plan.run_model, "synth": mask_tree(to_dict(cfg["synth"]))}
    reports = merged_reports(statuses, found)
    card = build_card(plan.task.describe(), records, reports, count, unit, plan.out_dir, config,
                      shards=shard_summary(statuses, len(records), _job_overrides()[1]))
    card.update(data_contract_facts(plan, records))
    write_card(plan.out_dir, card)
    log.info("merged %d shard(s) into %s (%d records)", len(statuses), plan.out_dir / "data.jsonl", len(records))
    return card


def _refuse_unfinished(plan: Plan, statuses: dict[int, dict[str, Any]], out: Path) -> None:
    """A one-line refusal naming every shard that is not done and the command that reruns only it."""
    problems = []
    for i in range(plan.shards.num_shards):
        st = statuses.get(i)
        if st is not None and st.get("state") == "done":
            continue
        if st is None:
            why = "has not run"
        elif st.get("state") == "failed":
            why = f"failed ({st.get('error')})"
        else:
            why = (f"has not finished (started {_iso(st.get('started'))} on {st.get('host')}, pid {st.get('pid')}: "
                   "still running, or killed)")
        problems.append(f"shard {i} of {plan.shards.num_shards} {why}: rerun it with `{rerun_command(i)}`")
    if problems:
        raise GenpiError(f"cannot merge {out}: " + "; ".join(problems))


def merged_reports(statuses: dict[int, dict[str, Any]], found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One report per stage over every shard: counts and seconds summed (pseudo inputs: the shared list's
    numbers, its time the longest shard's), records as found in the store."""
    reports: dict[str, dict[str, Any]] = {}
    done = [statuses[i] for i in sorted(statuses)]
    for name in STAGES:
        per = [st["stages"][name] for st in done if name in (st.get("stages") or {})]
        if not per:
            continue
        rep = dict(per[0])
        if len(per) > 1:
            if any(p.get("ran") == "computed" for p in per):
                rep["ran"] = "computed"
            if name == "pseudo_inputs":
                rep["seconds"] = max(p.get("seconds") or 0 for p in per)
                if "rounds_generated" in rep:
                    rep["rounds_generated"] = sum(p.get("rounds_generated") or 0 for p in per)
            else:
                for key in ("records", "computed", "from_store", "seconds"):
                    if key in rep:
                        rep[key] = sum(p.get(key) or 0 for p in per)
        if name in found and name != "pseudo_inputs":
            rep["records"] = found[name].get("records", rep.get("records"))
            if "ended_by" in found[name]:
                rep["ended_by"] = found[name]["ended_by"]
        reports[name] = rep
    return reports


def shard_summary(statuses: dict[int, dict[str, Any]], records: int, data_parallel_size: int = 1) -> dict[str, Any]:
    """Per-shard counts and times (each shard's last run), and the throughput of the whole run: records over
    the wall time from the first shard's start to the last one's finish."""
    per_shard = []
    for i in sorted(statuses):
        st = statuses[i]
        stages = st.get("stages") or {}
        seconds = float(st.get("seconds") or 0.0)
        own = int(st.get("records") or 0)
        per_shard.append({
            "shard": i, "host": st.get("host"), "started": _iso(st.get("started")), "seconds": round(seconds, 3),
            "records": own, "records_per_second": round(own / seconds, 3) if seconds > 0 else None,
            "computed": {n: r.get("computed") for n, r in stages.items() if r.get("ran") == "computed"},
            "stage_seconds": {n: round(float(r.get("seconds") or 0), 3) for n, r in stages.items()
                              if r.get("ran") == "computed"},
        })
    starts = [statuses[i]["started"] for i in statuses if statuses[i].get("started")]
    ends = [statuses[i]["finished"] for i in statuses if statuses[i].get("finished")]
    wall = max(ends) - min(starts) if starts and ends else None
    return {"num_shards": len(statuses), "engines_per_job": data_parallel_size,
            "wall_seconds": round(wall, 3) if wall else None, "records": records,
            "records_per_second": round(records / wall, 3) if wall else None, "per_shard": per_shard}


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return _dt.datetime.fromtimestamp(float(epoch), _dt.timezone.utc).isoformat(timespec="seconds")


# -- the command lines a message names ---------------------------------------------------------------------
# A data-parallel job passes its own command line to its engine processes, so that their messages name the
# job to rerun, not an engine: (overrides of the job, engines per job).
_JOB_COMMAND: tuple[list[str], int] | None = None


def _job_overrides() -> tuple[list[str], int]:
    if _JOB_COMMAND is not None:
        return _JOB_COMMAND
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task), 1
    return [], 1


def _command(extra: list[str], drop: tuple[str, ...]) -> str:
    overrides, _ = _job_overrides()
    kept = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(drop)]
    return " ".join(["genpi-synth", *(shlex.quote(o) for o in kept + extra)])


def rerun_command(shard: int) -> str:
    """The command that reruns only the job of (effective) shard ``shard``: this run's overrides, that shard."""
    _, engines = _job_overrides()
    return _command([f"synth.shard={shard // engines}"], ("synth.shard", "synth.merge_only", "hydra/launcher",
                                                           "hydra.launcher"))


def merge_command() -> str:
    return _command(["synth.merge_only=true"], ("synth.shard", "synth.merge_only", "hydra/launcher", "hydra.launcher"))


# -- several engines in one job --------------------------------------------------------------------------------
def gpu_groups(engines: int, per_engine: int) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` of each engine: consecutive groups of ``per_engine`` of the job's GPUs (None
    without GPUs: engines share the CPU). Refuses when the job has too few GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        try:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        except ImportError:
            devices = []
    if not devices:
        return None
    if len(devices) < engines * per_engine:
        raise GenpiError(
            f"synth.data_parallel_size={engines} x synth.clients.vllm.tensor_parallel_size={per_engine} needs "
            f"{engines * per_engine} GPUs; this job sees {len(devices)}: lower one of them, or ask Slurm for more "
            "(hydra.launcher.gpus_per_node)"
        )
    return [",".join(devices[j * per_engine : (j + 1) * per_engine]) for j in range(engines)]


def _engine_main(cfg: dict[str, Any], job: tuple[list[str], int], results) -> None:
    """One engine process of a data-parallel job: one shard of ``K * D``."""
    global _JOB_COMMAND
    _JOB_COMMAND = job
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    try:
        res = synthesize(cfg)
        results.put((cfg["synth"]["shard"], res.merged, None))
    except GenpiError as err:
        results.put((cfg["synth"]["shard"], False, str(err)))
        raise SystemExit(2) from None


def run_engines(cfg: DictConfig | dict[str, Any], plan: Plan) -> SynthResult:
    """``synth.data_parallel_size=D``: D processes in this job, each with its own engine (on its own group of
    ``tensor_parallel_size`` GPUs) synthesizing shard ``i*D + j`` of ``K*D``: vLLM's data parallelism for
    models that fit one GPU group, without a coordinator (each engine's work is a shard, merged as shards are)."""
    import multiprocessing as mp

    shards = plan.shards
    engines = shards.data_parallel_size
    tp = int((plan.client_settings.get("vllm") or {}).get("tensor_parallel_size") or 1)
    groups = gpu_groups(engines, tp)
    base = {k: to_dict(cfg[k]) if isinstance(cfg[k], (DictConfig, dict)) else cfg[k]
            for k in ("task", "model", "synth", "seed") if k in cfg}
    job = (_job_overrides()[0], engines)
    spawn = mp.get_context("spawn")  # a fresh interpreter per engine: CUDA and vLLM must not be forked
    results = spawn.Queue()
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for j in range(engines):
            sub = {**base, "synth": {**base["synth"], "num_shards": shards.num_shards * engines,
                                     "shard": shards.shard * engines + j, "data_parallel_size": 1,
                                     "progress": bool(base["synth"].get("progress", True)) and j == 0}}
            if groups is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = groups[j]  # a spawned child starts with this environment
            proc = spawn.Process(target=_engine_main, args=(sub, job, results), name=f"genpi-synth-engine-{j}")
            proc.start()
            procs.append(proc)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    for proc in procs:
        proc.join()
    outcome = {}
    while not results.empty():
        shard, merged, error = results.get()
        outcome[shard] = (merged, error)
    failed = [(j, p.exitcode) for j, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        details = "; ".join(f"engine {j} (shard {shards.shard * engines + j}): "
                            + (outcome.get(shards.shard * engines + j, (0, None))[1] or f"exit code {code}")
                            for j, code in failed)
        raise GenpiError(f"{len(failed)} of {engines} engines of this job failed: {details}; rerun "
                         f"`{rerun_command(shards.shard * engines)}` to resume them")
    merged = any(m for m, _ in outcome.values())
    if merged and plan.progress:
        card = json.loads((plan.out_dir / "card.json").read_text(encoding="utf-8"))
        if isinstance(cfg, DictConfig) and cfg.get("logger"):
            report_card(cfg, card)
    return SynthResult(plan.out_dir, merged)


def data_contract_facts(plan: Plan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What training checks a dataset against: repeated inputs, and the tokenizer the stored top-k ids belong to."""
    from genpi.data.records import duplicate_inputs, input_key

    facts: dict[str, Any] = {"duplicate_inputs": len(duplicate_inputs(records, input_key))}
    stage = plan.stages.get("teacher_logits")
    if stage is not None and records and all("teacher_topk_ids" in r for r in records):
        from genpi.data.tokenize import tokenizer_fingerprint
        from genpi.models.factory import load_tokenizer

        facts["teacher_topk_tokenizer"] = tokenizer_fingerprint(load_tokenizer(stage.model))
    return facts


def report_card(cfg: DictConfig, card: dict[str, Any]) -> None:
    """The data card to the configured loggers (W&B: job_type synth, in the study's group): yields, counts and
    lengths as numbers, the stages as a table."""
    numbers = numeric_leaves({k: card[k] for k in ("records", "mean_lengths", "conversations_ended_by",
                                                  "pseudo_inputs") if isinstance(card.get(k), (dict, int))}, "synth")
    for stage, rep in card["stages"].items():
        numbers.update(numeric_leaves({k: v for k, v in rep.items() if k not in ("sampling", "env_sampling")},
                                      f"synth/{stage}"))
    columns = ["stage", "ran", "records", "computed", "seconds", "client", "model"]
    rows = [[stage, *(rep.get(c) for c in columns[1:])] for stage, rep in card["stages"].items()]
    report_to_loggers(cfg, "synth", numbers, tables={"synth/stages": (columns, rows)})


@hydra.main(version_base="1.3", config_path="conf", config_name="synth")
@task_wrapper
def _hydra_main(cfg: DictConfig) -> None:
    result = synthesize(cfg)
    sys.stderr.flush()
    if result.merged:
        print(f"dataset: {result.out_dir}", flush=True)
    else:
        shards = cfg.synth.num_shards * cfg.synth.data_parallel_size
        print(f"shard done: {result.out_dir} (shards {result.pending} of {shards} still to finish; the last one "
              "writes data.jsonl)", flush=True)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
