"""The plan of a synth run: stage settings resolved, fingerprinted and checked before any model loads.

Stages and what each one needs:

================  =================  ================================================
stage             needs              adds
================  =================  ================================================
pseudo_inputs     -                  pseudo_input
outputs           pseudo_inputs      teacher_output_single, student_output_single
reasons           outputs            reason
conversations     outputs            teacher_output_conv
teacher_logits    outputs            teacher_topk_ids, teacher_topk_logprobs
================  =================  ================================================

A stage's fingerprint hashes everything that decides what it writes (stage code version, client, model,
sampling, templates, the task's prompt and persona), never what only decides how fast (batch sizes,
concurrency). Each stage may use its own client, model (the run's model with the stage's keys on top) and
sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genpi.schema import SynthShards, read
from genpi.synthesis.clients import CLIENTS, Sampling
from genpi.synthesis.prompts import PSEUDO_INPUT_TEMPLATE, REASON_TEMPLATE
from genpi.synthesis.store import Store, stable_hash
from genpi.tasks.base import Task, task_fingerprint
from genpi.utils.errors import GenpiError

STAGES = ("pseudo_inputs", "outputs", "reasons", "conversations", "teacher_logits")
REQUIRES: dict[str, str | None] = {
    "pseudo_inputs": None, "outputs": "pseudo_inputs", "reasons": "outputs", "conversations": "outputs",
    "teacher_logits": "outputs",
}
PRODUCES: dict[str, tuple[str, ...]] = {
    "pseudo_inputs": ("pseudo_input",),
    "outputs": ("teacher_output_single", "student_output_single"),
    "reasons": ("reason",),
    "conversations": ("teacher_output_conv", "ended_by"),
    "teacher_logits": ("teacher_topk_ids", "teacher_topk_logprobs"),
}
# Bump when a stage's code changes what it writes: old store records then stop matching.
STAGE_VERSION = {"pseudo_inputs": 1, "outputs": 1, "reasons": 1, "conversations": 1, "teacher_logits": 1}


@dataclass
class StagePlan:
    """One stage's resolved settings: clients, models (run's model with this stage's overrides), sampling."""

    name: str
    settings: dict[str, Any]
    client: str
    model: dict[str, Any]
    sampling: Sampling | None
    fingerprint: str
    env_client: str | None = None
    env_model: dict[str, Any] | None = None
    env_sampling: Sampling | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client": self.client, "model": self.model.get("name_or_path"),
                               "fingerprint": self.fingerprint}
        if self.sampling is not None:
            out["sampling"] = self.sampling.as_dict()
        if self.env_model is not None:
            out.update(env_client=self.env_client, env_model=self.env_model.get("name_or_path"),
                       env_sampling=self.env_sampling.as_dict() if self.env_sampling else None)
        extra = {k: v for k, v in self.settings.items()
                 if k not in ("client", "model", "sampling", "env_client", "env_model", "env_sampling")}
        return {**out, **extra}


@dataclass
class Plan:
    """What a synth run will do, checked at load time."""

    task: Task
    requested: list[str]
    stages: dict[str, StagePlan]
    source: str  # "pseudo_inputs" (computed), "dataset" (synth.from_dataset) or "store:<stage>"
    out_dir: Path
    from_dataset: Path | None
    dataset_stages: tuple[str, ...] = ()
    chunk_size: int = 64
    progress: bool = True
    failed_samples: int = 5
    client_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_model: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    shards: SynthShards = field(default_factory=SynthShards)

    @property
    def run_key(self) -> str:
        """What the shards of one run share (and what their status files are filed under): the requested
        stages, every stage's fingerprint, where inputs come from, how many inputs, the shard count."""
        pi = self.stages["pseudo_inputs"].settings
        return stable_hash(self.requested, {n: s.fingerprint for n, s in self.stages.items()}, self.source,
                           str(self.from_dataset), pi.get("num_inputs"), pi.get("max_attempts"),
                           self.shards.num_shards)


def _merge_model(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """The run's model config with the stage's non-null keys on top."""
    out = dict(base)
    out.update({k: v for k, v in (override or {}).items() if v is not None})
    return out


def _model_identity(kind: str, model_cfg: dict[str, Any], client_settings: dict[str, Any]) -> Any:
    """What decides a model's outputs, for fingerprints: the served name for a server, else the model config."""
    if kind == "openai":
        return {"served": (client_settings.get("openai") or {}).get("model") or model_cfg.get("name_or_path")}
    try:
        from genpi.models.factory import model_fingerprint

        return model_fingerprint(model_cfg)
    except ImportError:
        return {k: v for k, v in model_cfg.items() if k not in ("lora", "gradient_checkpointing")}


def _sampling(stage: str, cfg: dict[str, Any] | None, key: str = "sampling", single: bool = True) -> Sampling:
    s = Sampling.from_cfg(cfg, where=f"synth.{stage}.{key}")
    if single and s.n != 1:
        raise GenpiError(f"synth.{stage}.{key}.n={s.n}: this stage keeps one answer per request; set it to 1")
    return s


def _check_client(stage: str, key: str, kind: str) -> str:
    if kind not in CLIENTS:
        raise GenpiError(f"synth.{stage}.{key}={kind!r} is unknown: choose one of {list(CLIENTS)}")
    return kind


def _check_template(stage: str, template: str | None, names: tuple[str, ...]) -> None:
    if template is None:
        return
    try:
        template.format(**{n: "" for n in names})
    except (KeyError, IndexError, ValueError) as err:
        raise GenpiError(
            f"synth.{stage}.template cannot be filled ({err!r}): it may use only the fields {{{'}, {'.join(names)}}}"
        ) from None


def task_inputs_path(task: Task, settings: dict[str, Any]) -> Path:
    """The file ``source=file`` reads: ``synth.pseudo_inputs.file`` or the task's built-in inputs."""
    if settings.get("file"):
        path = Path(str(settings["file"])).expanduser()
    elif hasattr(task, "inputs_path") and task.inputs_path() is not None:
        path = Path(task.inputs_path())
    else:
        raise GenpiError(f"task {task.name!r} has no built-in inputs file: set synth.pseudo_inputs.file=FILE")
    if not path.is_file():
        raise GenpiError(f"pseudo-input file not found: {path} (set synth.pseudo_inputs.file to an existing file)")
    return path


def make_plan(task: Task, synth: dict[str, Any], run_model: dict[str, Any], seed: int = 0) -> Plan:
    """Resolve and check a run: stage names and order, prerequisites, clients, sampling, templates, files.

    Raises :class:`GenpiError` naming the fix for anything that would fail later.
    """
    shards = read(synth, SynthShards, "synth")
    requested = list(synth.get("stages") or [])
    unknown = [s for s in requested if s not in STAGES]
    if unknown or not requested:
        raise GenpiError(f"synth.stages={requested}: choose stages from {list(STAGES)}")
    if len(set(requested)) != len(requested):
        raise GenpiError(f"synth.stages={requested} names a stage twice")
    requested = [s for s in STAGES if s in requested]
    client_settings = {k: dict(v or {}) for k, v in (synth.get("clients") or {}).items()}
    default_client = synth.get("client") or "hf"
    if default_client not in CLIENTS:
        raise GenpiError(f"synth.client={default_client!r} is unknown: choose one of {list(CLIENTS)}")

    stages: dict[str, StagePlan] = {}
    fp_task = task_fingerprint(task)
    for name in STAGES:
        block = dict(synth.get(name) or {})
        kind = _check_client(name, "client", block.get("client") or default_client)
        model = _merge_model(run_model, block.get("model"))
        identity: dict[str, Any] = {"stage": name, "version": STAGE_VERSION[name], "client": kind,
                                    "model": _model_identity(kind, model, client_settings)}
        sampling = env_kind = env_model = env_sampling = None
        if name == "pseudo_inputs":
            source = block.get("source", "file")
            if source not in ("file", "generate", "templates"):
                raise GenpiError(f"synth.pseudo_inputs.source={source!r}: choose file, generate or templates")
            if source == "templates":
                from genpi.tasks import generators
                from genpi.tasks.generators import GENERATORS, SPLITS

                split = block.get("split") or "heldout"
                if task.name not in GENERATORS:
                    raise GenpiError(f"synth.pseudo_inputs.source=templates: task {task.name!r} has no input "
                                     f"templates (built-in tasks: {sorted(GENERATORS)}); use source=file or generate")
                if split not in SPLITS:
                    raise GenpiError(f"synth.pseudo_inputs.split={split!r}: choose one of {list(SPLITS)}")
                if not block.get("num_inputs"):
                    raise GenpiError("synth.pseudo_inputs.source=templates needs synth.pseudo_inputs.num_inputs=N")
                # Drawn in a fixed order: asking for more inputs extends the same list.
                identity = {"stage": name, "version": STAGE_VERSION[name], "source": "templates", "split": split,
                            "seed": int(block.get("seed") or 0), "task": task.name,
                            "templates": stable_hash(Path(generators.__file__).read_text(encoding="utf-8"))}
            elif source == "file":
                identity = {"stage": name, "version": STAGE_VERSION[name], "source": "file"}
                if name in requested:
                    path = task_inputs_path(task, block)
                    identity["file_sha"] = stable_hash(path.read_text(encoding="utf-8"), length=32)
            else:
                sampling = _sampling(name, block.get("sampling"), single=False)
                _check_template(name, block.get("template"), ("prompt", "examples", "k"))
                if name in requested:
                    if task.parser is None:
                        raise GenpiError(
                            f"task {task.name!r} has no pseudo-input parser: set task.parser, or use "
                            "synth.pseudo_inputs.source=file"
                        )
                    if not block.get("num_inputs"):
                        raise GenpiError("synth.pseudo_inputs.source=generate needs synth.pseudo_inputs.num_inputs=N")
                # num_inputs and max_attempts only say when to stop: raising them continues the same rounds.
                identity.update(sampling=sampling.as_dict(), template=block.get("template") or PSEUDO_INPUT_TEMPLATE,
                                prompt=task.prompt_text, parser=task.parser, demos=task.demonstrations,
                                **{k: block.get(k) for k in ("requests_per_round", "inputs_per_request",
                                                             "num_demonstrations")})
        elif name == "outputs":
            sampling = _sampling(name, block.get("sampling"))
            identity.update(sampling=sampling.as_dict(), task=fp_task)
        elif name == "reasons":
            sampling = _sampling(name, block.get("sampling"))
            _check_template(name, block.get("template"), ("prompt", "input", "student", "teacher"))
            identity.update(sampling=sampling.as_dict(), prompt=task.prompt_text,
                            template=block.get("template") or REASON_TEMPLATE)
        elif name == "conversations":
            sampling = _sampling(name, block.get("sampling"))
            env_kind = _check_client(name, "env_client", block.get("env_client") or kind)
            env_model = _merge_model(model, block.get("env_model"))
            env_sampling = _sampling(name, block.get("env_sampling"), key="env_sampling")
            max_turns = block.get("max_turns") or task.max_turns
            if name in requested and not task.env_persona.strip():
                raise GenpiError(
                    f"task {task.name!r} has no environment persona for role swapping: set task.env_persona, "
                    "or drop conversations from synth.stages"
                )
            if int(max_turns) < 1:
                raise GenpiError(f"synth.conversations.max_turns={max_turns}: need at least 1 agent turn")
            identity.update(sampling=sampling.as_dict(), task=fp_task, max_turns=int(max_turns),
                            env_client=env_kind, env_model=_model_identity(env_kind, env_model, client_settings),
                            env_sampling=env_sampling.as_dict(), reuse=bool(block.get("reuse_teacher_output", True)),
                            end_token=task.end_token)
        elif name == "teacher_logits":
            k = int(block.get("top_k") or 0)
            if k < 1:
                raise GenpiError(f"synth.teacher_logits.top_k={block.get('top_k')}: need at least 1")
            identity.update(top_k=k, task=fp_task)
        stages[name] = StagePlan(name, block, kind, model, sampling, stable_hash(identity), env_kind, env_model,
                                 env_sampling)

    out_dir = Path(str(synth.get("out_dir") or "outputs/synth")).expanduser()
    plan = Plan(task=task, requested=requested, stages=stages, source="pseudo_inputs", out_dir=out_dir,
                from_dataset=None, chunk_size=max(1, int(synth.get("chunk_size") or 64)),
                progress=bool(synth.get("progress", True)), failed_samples=int(synth.get("failed_samples") or 0),
                client_settings=client_settings, run_model=dict(run_model), seed=int(seed), shards=shards)
    _plan_source(plan, synth.get("from_dataset"))
    return plan


def lineage(stage: str) -> list[str]:
    out = []
    cur: str | None = stage
    while cur is not None:
        out.append(cur)
        cur = REQUIRES[cur]
    return out


def _plan_source(plan: Plan, from_dataset: str | None) -> None:
    """Where the first requested stage's inputs come from, and whether every stage has what it needs."""
    first = plan.requested[0]
    prereq = REQUIRES[first]
    if from_dataset:
        path = Path(str(from_dataset)).expanduser()
        plan.from_dataset = path
        plan.source = "dataset"
        plan.dataset_stages = dataset_stages(path)
        available = set(plan.dataset_stages)
        if "pseudo_inputs" not in available:
            raise GenpiError(f"synth.from_dataset={path} has no pseudo_input column")
    elif prereq is None:
        available = set()
    else:
        if Store(plan.out_dir / "store").has(prereq, plan.stages[prereq].fingerprint):
            plan.source = f"store:{prereq}"
            available = set(lineage(prereq))
        else:
            available = set()
    for stage in plan.requested:
        need = REQUIRES[stage]
        if need is not None and need not in available:
            chain = [s for s in STAGES if s in set(plan.requested) | set(lineage(need))]
            cols = ", ".join(PRODUCES[need][:2])
            raise GenpiError(
                f"synth stage {stage!r} needs the results of {need!r}, which this run neither computes nor finds: "
                f"run it too (synth.stages=[{','.join(chain)}]), or set synth.from_dataset to a dataset with {cols}, "
                f"or run {need!r} first in this folder ({plan.out_dir}) with the same settings"
            )
        available.add(stage)


def dataset_stages(path: Path) -> tuple[str, ...]:
    """Stages whose columns a dataset holds: those its data card lists for a genpi folder, else those whose
    columns are non-empty in at least one record (a genpi file writes every column, empty or not)."""
    from genpi.data.records import load_records

    card = path / "card.json" if path.is_dir() else None
    if card is not None and card.is_file():
        listed = json.loads(card.read_text(encoding="utf-8")).get("stages") or {}
        return tuple(s for s in STAGES if s in listed)
    records = load_records(path, columns=("pseudo_input",))
    have = []
    for stage in STAGES:
        cols = [c for c in PRODUCES[stage] if c != "ended_by"]
        if all(any(r.get(c) not in (None, "", []) for r in records) for c in cols):
            have.append(stage)
    return tuple(have)
