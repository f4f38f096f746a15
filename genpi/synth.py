"""genpi-synth: synthesize a GenPI dataset (``python -m genpi.synth``).

Stages: pseudo inputs -> teacher and student answers -> reasons -> role-swapped conversations
[-> teacher top-k log-probs]; see :mod:`genpi.synthesis.plan` and :mod:`genpi.synthesis.stages`. The dataset folder holds
``data.jsonl`` (what ``genpi.data.records.load_records`` reads), ``card.json``, ``README.md`` and
``store/`` (the resumable shards).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from genpi import schema
from genpi.data.records import write_jsonl
from genpi.hydra_utils import to_dict
from genpi.redact import mask_tree
from genpi.synthesis.card import build_card, print_summary, token_counter, write_card
from genpi.synthesis.clients import ClientPool
from genpi.synthesis.plan import Plan, make_plan
from genpi.synthesis.stages import Row, run_stages
from genpi.synthesis.store import Store, stable_hash
from genpi.tasks import build_task
from genpi.tasks.base import Task
from genpi.tracking import numeric_leaves, report_to_loggers
from genpi.wrappers import task_wrapper

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
    """Build the task and check the run's plan (stages, prerequisites, clients, sampling) before any model loads."""
    task_cfg = to_dict(cfg["task"])
    task = build_task(**task_cfg)
    return make_plan(task, to_dict(cfg["synth"]), to_dict(cfg["model"]), seed=int(cfg.get("seed") or 0))


def run_synthesis(cfg: DictConfig | dict[str, Any]) -> Path:
    """Run the configured stages and write the dataset folder; returns that folder (``synth.out_dir``).

    ``cfg`` needs ``task``, ``model``, ``synth`` and optionally ``seed`` (the layout of ``conf/synth.yaml``).
    A rerun with the same config resumes from the store; a :class:`GenpiError` is raised at load time for
    bad settings and at the end of a stage that yields nothing.
    """
    if isinstance(cfg, DictConfig):
        schema.check(cfg, "synth")  # every key typed and in range before any model loads
    plan = plan_from_cfg(cfg)
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    log.info("synthesizing %s into %s (stages %s, inputs from %s)", plan.task.name, out, plan.requested, plan.source)
    clients = ClientPool(plan.client_settings, seed=plan.seed)
    with Store(out / "store") as store:
        try:
            rows, reports = run_stages(plan, store, clients)
        finally:
            clients.close()
        records = assemble(plan.task, rows)
        write_jsonl(records, out / "data.jsonl")
        count, unit = token_counter(plan.run_model)
        config = {"task": plan.task.describe(), "model": plan.run_model, "synth": mask_tree(to_dict(cfg["synth"]))}
        card = build_card(plan.task.describe(), records, reports, count, unit, out, config)
        card.update(data_contract_facts(plan, records))
        write_card(out, card)
    for col in card["empty_columns"]:
        log.warning("column %s is empty in %s: run its stage to fill it", col, out / "data.jsonl")
    if plan.progress:
        print_summary(card)
    if isinstance(cfg, DictConfig) and cfg.get("logger"):
        report_card(cfg, card)
    return out


def data_contract_facts(plan: Plan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What training checks a dataset against: repeated inputs, and the tokenizer the stored top-k ids belong to."""
    from genpi.data.datamodule import input_key
    from genpi.data.records import duplicate_inputs

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
    out = run_synthesis(cfg)
    sys.stderr.flush()
    print(f"dataset: {out}", flush=True)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
