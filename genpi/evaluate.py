"""genpi-eval: how well a trained adapter internalized the prompt, and what dropping the prompt saves
(``python -m genpi.evaluate run_dir=...``). See ``conf/eval.yaml`` for every option."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from genpi import schema
from genpi.data.tokenize import (
    Limits,
    RecordEncoder,
    alternating_agent_turns,
    encode,
    render,
    student_prefix_ids,
    teacher_prefix_ids,
    truncate_text,
)
from genpi.environments import evaluate as env_eval
from genpi.evaluation import artifacts, savings
from genpi.models.factory import load_model, load_tokenizer, model_fingerprint, resolve_model_path
from genpi.tasks import build_task
from genpi.utils.hydra_utils import to_dict
from genpi.utils.tracking import numeric_leaves, report_to_loggers
from genpi.utils.wrappers import run_dir_of, task_wrapper

log = logging.getLogger("genpi.evaluate")


def _stop_ids(tokenizer) -> list[int]:
    from genpi.synthesis.clients.base import end_of_turn_ids

    return end_of_turn_ids(tokenizer)


def load_student(model_cfg: Any, adapter_dir: Path):
    """The base model with the adapter loaded (inference mode); ``disable_adapter()`` gives the base back."""
    from peft import PeftModel

    base = load_model(model_cfg, for_training=False)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


def run_evaluation(cfg: DictConfig) -> Path:
    """Evaluate one adapter on held-out inputs; write ``metrics.json``, ``report.md``, ``examples.jsonl`` and the
    plots into this run's folder. Returns the report's path."""
    t_start = time.perf_counter()
    out_dir = run_dir_of(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = schema.check(cfg, "eval")  # every key typed and in range before any model loads
    # torch, Lightning and matplotlib load only now: --help, --cfg and a bad config answer at once
    from genpi.data.datamodule import Collator
    from genpi.evaluation import generation, metrics, report
    from genpi.module import GenPIModule

    ev = spec.eval
    engine = generation.pick_engine(ev.engine)

    # 1. what to evaluate, refused early if it does not fit
    task = build_task(**to_dict(cfg.task))
    env_prep = env_eval.prepare(cfg, task)  # eval.env: settings and problems checked before any model loads
    tokenizer = load_tokenizer(cfg.model)
    model_name = model_fingerprint(cfg.model)
    art = artifacts.locate(cfg.get("run_dir"), cfg.get("adapter"), cfg.paths.output_root, task.name, model_name,
                           out_dir, cfg.model)
    artifacts.check_compatible(art, task, model_name)
    records, source = artifacts.eval_records(art, ev.inputs_file, ev.split, ev.allow_overlap, ev.max_examples)
    log.info("evaluating %s on %d inputs (%s), engine %s", art.adapter_dir, len(records), source["inputs"], engine)

    # 2. the exact token ids each model reads
    limits = Limits(**dataclasses.asdict(spec.data.limits))
    encoder = RecordEncoder(tokenizer, task, limits)
    inputs = [truncate_text(tokenizer, r["pseudo_input"], limits.input_tokens)[0] for r in records]
    teacher_ids = [teacher_prefix_ids(tokenizer, task, x, encoder.prompt) for x in inputs]
    student_ids = [student_prefix_ids(tokenizer, task, x) for x in inputs]
    sets = _prompt_sets(teacher_ids, student_ids)
    sav_cfg = ev.savings
    timing = (generation.TimingSpec(sav_cfg.new_tokens, sav_cfg.requests, sav_cfg.repeats)
              if sav_cfg.measure else None)
    stop_ids = _stop_ids(tokenizer)
    max_new = ev.max_new_tokens

    # 3. greedy answers (and timings): vLLM first, in its own process, so its memory is free for the KL pass
    if engine == "vllm":
        vcfg = ev.vllm
        model_path = resolve_model_path(cfg.model)

        def vllm_job(job_sets, new_tokens, job_timing, prefix_caching):
            return generation.vllm_job(model_path, str(cfg.model.dtype), art.adapter_dir, job_sets, new_tokens,
                                       stop_ids, job_timing, seed=spec.seed, enable_prefix_caching=prefix_caching,
                                       max_model_len=vcfg.max_model_len,
                                       gpu_memory_utilization=vcfg.gpu_memory_utilization)

        cache_runs = list(sav_cfg.prefix_caching) if timing else []
        main_timed = vcfg.enable_prefix_caching in cache_runs
        # Savings are timed both cache-cold (every request reads the prompt) and with prefix caching on (what a
        # server with a fixed prompt keeps warm): each setting is an engine of its own, timed side by side inside;
        # the engines run one after the other in one worker process (vLLM imported once).
        other_caching = list(dict.fromkeys(c for c in cache_runs if c != vcfg.enable_prefix_caching))
        jobs = [vllm_job(sets, max_new, timing if main_timed else None, vcfg.enable_prefix_caching)]
        jobs += [vllm_job([s for s in sets if s.name in ("teacher", "student")], 1, timing, caching)
                 for caching in other_caching]
        results = generation.run_vllm_worker(jobs, out_dir / "vllm", timeout_s=vcfg.timeout_s,
                                             kvcache_gb=vcfg.kvcache_gb, multiprocessing=vcfg.multiprocessing,
                                             cpu_threads_bind=vcfg.cpu_threads_bind)
        result = results[0]
        timing_by_cache = {vcfg.enable_prefix_caching: result.get("timing")} if main_timed else {}
        for caching, timed in zip(other_caching, results[1:]):
            timing_by_cache[caching] = timed.get("timing")
        if timing_by_cache:
            result["timing"] = timing_by_cache.get(False) or next(iter(timing_by_cache.values()))
            result["timing_by_cache"] = timing_by_cache
        model = load_student(cfg.model, art.adapter_dir)
    else:
        model = load_student(cfg.model, art.adapter_dir)
        result = generation.hf_run(model, sets, max_new, stop_ids, tokenizer.pad_token_id, timing,
                                   batch_size=ev.batch_size)
    t_generated = time.perf_counter()
    answers = _decoded(tokenizer, result["outputs"])

    # 4. KL to the teacher on the teacher's answers: the dataset's where it has them, else the greedy ones
    notes: list[str] = []
    use_record = [ev.kl_on == "record" and bool(r.get("teacher_output_single")) for r in records]
    kl_answers = [r["teacher_output_single"] if u else answers["teacher"][i]
                  for i, (r, u) in enumerate(zip(records, use_record))]
    kl_source = ("the dataset's" if all(use_record) else "greedy" if not any(use_record)
                 else "the dataset's (greedy where it has none)")
    module = GenPIModule(model, {"kl": {"weight": 0.0, "prefix_cache": True}}, {}, encoder.prompt.ids).eval()
    collate = Collator(tokenizer.pad_token_id)
    # stored top-k rows belong to the stored answer; the teacher here is always run online
    examples_kl = [{"kl": encoder.kl({**{k: v for k, v in r.items() if not k.startswith("teacher_topk")},
                                      "teacher_output_single": a})}
                   for r, a in zip(records, kl_answers)]
    bs = ev.batch_size
    batches = (collate(examples_kl[i : i + bs]) for i in range(0, len(examples_kl), bs))
    kl = metrics.kl_to_teacher(module, batches, chunk_size=ev.chunk_size)
    t_kl = time.perf_counter()

    # 5. agreement and format, per example and per model
    per_example: dict[str, dict[str, list[float]]] = {}
    has_format = task.format is not None
    for m in metrics.MODELS:
        per_example[m] = metrics.agreement(answers[m], answers["teacher"])
        if has_format:
            per_example[m]["format_ok"] = metrics.format_flags(answers[m], task.check_format)
    if not has_format:
        notes.append(f"task {task.name} has no format check (task.format is null): no format rate")
    table = metrics.summarize(per_example, kl, has_format)
    later = later_turn_prompts(tokenizer, task, records, inputs, ev.turns) if has_format and ev.turns > 1 else []
    if later:  # the agent's later turns, each after the record's turns before it (transformers, greedy)
        later_sets = _prompt_sets([t for t, _ in later], [u for _, u in later])
        later_out = generation.hf_run(model, later_sets, max_new, stop_ids, tokenizer.pad_token_id,
                                      batch_size=ev.batch_size)["outputs"]
        later_answers = _decoded(tokenizer, later_out)
        for m in metrics.MODELS:
            table[m]["format_rate_later_turns"] = metrics.mean(metrics.format_flags(later_answers[m],
                                                                                     task.check_format))
        table["gap_closed"]["format_rate_later_turns"] = metrics.gap_closed(
            *(table[m]["format_rate_later_turns"] for m in ("floor", "student", "teacher")))
    elif ev.turns > 1:
        notes.append(f"eval.turns={ev.turns}: no record has a later agent turn (or the task has no format check)")

    # 6. savings
    params = savings.count_parameters(model)["compute"]
    sav = savings.compute_savings([len(t) for t in teacher_ids], [len(s) for s in student_ids],
                                  [len(a) for a in result["outputs"]["teacher"]], params)
    if result.get("timing"):
        sav.update(timing=result["timing"], timing_engine=engine,
                   timing_new_tokens=timing.new_tokens if timing else None,
                   timing_reduction=savings.timing_savings(result["timing"]))
        if result.get("timing_by_cache"):
            sav["timing_prefix_caching"] = {
                ("warm" if caching else "cold"): {"timing": t, "timing_reduction": savings.timing_savings(t)}
                for caching, t in result["timing_by_cache"].items() if t}
        if engine == "hf":
            notes.append("latency measured with transformers (vLLM not used): install vllm for serving-engine figures; "
                         "no prefix caching (every request reads its prompt)")

    # 7. agents acting in the environment (eval.env.enabled): success rates of teacher, student, floor
    if env_prep is not None:
        vcfg = ev.vllm
        out_env, info_env = env_eval.evaluate(env_prep, engine, art.adapter_dir, out_dir, ev.batch_size,
                                              {"timeout_s": vcfg.timeout_s, "kvcache_gb": vcfg.kvcache_gb,
                                               "multiprocessing": vcfg.multiprocessing},
                                              model=model if engine == "hf" else None)

    # 8. the report
    examples = report.example_rows([r["pseudo_input"] for r in records], answers, kl_answers, per_example, kl)
    plots, plot_notes = report.make_plots(out_dir, art.run_dir, kl, table)
    notes += plot_notes
    if art.from_checkpoint:
        notes.append(f"the run had no adapter/ folder; the adapter was rebuilt from {art.from_checkpoint}")

    info = {
        "task": task.name, "prompt_id": task.prompt_id, "model": model_name, "adapter": str(art.adapter_dir),
        "run_dir": str(art.run_dir) if art.run_dir else None,
        "checkpoint": str(art.from_checkpoint) if art.from_checkpoint else None,
        "engine": engine, "max_new_tokens": max_new, "kl_on": kl_source, "notes": notes, "later_turns": len(later),
        "vllm_version": result.get("vllm_version"), "seconds": time.perf_counter() - t_start,
        "seconds_generation": t_generated - t_start, "seconds_kl": t_kl - t_generated, **source,
    }
    out = {**table, "savings": sav, "info": info, "n_examples": len(records)}
    tables = {}
    if env_prep is not None:
        out["env"], info["env"] = out_env, info_env
        tables["eval/env"] = report.env_table_rows(out_env, info_env["sides"])
    report.write_examples(out_dir, examples)
    path = report.write_report(out_dir, out, examples, plots, n_show=ev.show_examples)
    columns = list(table["teacher"])
    rows = [[m, *(table[m].get(k) for k in columns)] for m in (*metrics.MODELS, "gap_closed")]
    report_to_loggers(cfg, "eval", numeric_leaves({k: v for k, v in out.items() if k != "info"}, "eval"),
                      tables={"eval/models": (["model", *columns], rows), **tables},
                      images={f"eval/{Path(png).stem}": out_dir / png for png in plots.values()})
    log.info("evaluation done in %.1f s: %s", info["seconds"], path)
    return path


def later_turn_prompts(tokenizer, task, records: list[dict[str, Any]], inputs: list[str], turns: int
                       ) -> list[tuple[list[int], list[int]]]:
    """(teacher ids, student ids) up to each later agent turn of the records' ``teacher_output_conv``: agent turn
    k (2 <= k <= ``turns``) follows the record's agent and environment turns before it, after the teacher's view
    (with the prompt) or the student's (without)."""
    out = []
    for record, x in zip(records, inputs):
        conv = alternating_agent_turns(record.get("teacher_output_conv") or [], turns)
        for k in range(2, len(conv), 2):  # agent turn k // 2 + 1 after the record's turns before it
            out.append(tuple(encode(tokenizer, render(tokenizer, view + conv[:k], add_generation_prompt=True))
                             for view in (task.teacher_messages(x), task.student_messages(x))))
    return out


def _prompt_sets(teacher_ids: list[list[int]], student_ids: list[list[int]]) -> list:
    """The three sides' prompts: the teacher (base + prompt), the student (adapter, no prompt), the floor (base,
    no prompt)."""
    from genpi.evaluation import generation

    return [generation.PromptSet("teacher", teacher_ids, adapter=False),
            generation.PromptSet("student", student_ids, adapter=True),
            generation.PromptSet("floor", student_ids, adapter=False)]


def _decoded(tokenizer, outputs: dict[str, list[list[int]]]) -> dict[str, list[str]]:
    """Each side's generated ids as stripped text."""
    from genpi.evaluation import metrics

    return {m: [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs[m]] for m in metrics.MODELS}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@task_wrapper
def _hydra_main(cfg: DictConfig) -> float | None:
    path = run_evaluation(cfg)
    print(f"report: {path}", flush=True)
    value = metrics_from_report(path).get("gap_closed", {}).get("kl_forward")
    return value


def metrics_from_report(report_path: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` beside a report."""
    import json

    return json.loads((Path(report_path).parent / "metrics.json").read_text())


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
