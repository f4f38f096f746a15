"""The figures the READMEs state equal the committed artifacts they come from (pure file reading, no model).

A README names the artifact behind its figures in an HTML comment, ``<!-- figures: PATH [PATH ...] -->``, invisible
when rendered, placed above a table or paragraph (or inline, inside a list item). The block it covers runs from
the start of the marker's paragraph to the next heading or the next marker. Each PATH (optionally ``PATH#label``
when one artifact backs several blocks) has a checker here that renders the figures from the artifact, rounded as
the README rounds them, and asserts they stand in the block: a README number that drifts from its artifact (or an
artifact rerun without the README following) fails, and so does a marker without a checker or a checker without a
marker.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("experiments/*/README.md"))]
MARKER = re.compile(r"<!-- figures: (.+?) -->")


# -- reading ------------------------------------------------------------------------------------------------------
def blocks(readme: str) -> list[tuple[str, str]]:
    """``(artifact key, block text)`` for every marker of one README."""
    lines = (ROOT / readme).read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        for match in MARKER.finditer(line):
            start = i
            while start > 0 and lines[start - 1].strip():  # the start of the marker's paragraph
                start -= 1
            end = i + 1
            while end < len(lines) and not lines[end].startswith("#") and not MARKER.search(lines[end]):
                end += 1
            text = "\n".join(lines[start:end])
            out.extend((key, text) for key in match.group(1).split())
    return out


def tables(block: str) -> list[list[list[str]]]:
    """The body rows of every Markdown table in a block, cells stripped (``\\|`` kept inside a cell)."""
    out: list[list[str]] = []
    runs: list[list[str]] = []
    for ln in [*block.splitlines(), ""]:
        if ln.lstrip().startswith("|"):
            out.append(ln)
        elif out:
            runs.append(out)
            out = []
    return [[[c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]] for ln in rows[2:]] for rows in runs]


def table(block: str) -> list[list[str]]:
    found = tables(block)
    assert found, "no table in the block"
    return found[0]


def load(path: str) -> dict | list:
    return json.loads((ROOT / path).read_text())


def csv_rows(path: str) -> list[dict[str, str]]:
    with (ROOT / path).open(newline="") as f:
        return list(csv.DictReader(f))


# -- rounding as the READMEs round ---------------------------------------------------------------------------------
def fixed(x: float, digits: int) -> str:
    """Half-up rounding to ``digits`` decimals (0.625 -> 0.63, as a reader rounds; Python's round() gives 0.62)."""
    d = Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return str(abs(d) if d == 0 else d)  # -0.0 (a gap closed of minus nothing) reads 0


def pct(x: float, digits: int = 0) -> str:
    return fixed(100 * x, digits)


def sig3(x: float) -> str:
    """A speed-up as the bench table writes it: 3 significant figures (2.09, 16.9)."""
    return fixed(x, 1) if x >= 10 else fixed(x, 2)


def thousands(x: float) -> str:
    return f"{int(Decimal(repr(float(x))).quantize(Decimal(1), rounding=ROUND_HALF_UP)):,}"


def millions(x: float) -> str:
    return fixed(x / 1e6, 1) + " M"


def contains(block: str, *phrases: str) -> None:
    text = " ".join(MARKER.sub("", block).split())  # line breaks and list indentation read as one space
    missing = [p for p in phrases if p not in text]
    assert not missing, f"not in the README (the artifact says so): {missing}"


# -- one checker per artifact ----------------------------------------------------------------------------------------
LOSS_NAMES = {"genpi": "GenPI", "genpi_kl": "GenPI + KL"}


def check_demo_selection(block: str) -> None:
    rows = csv_rows("experiments/demo/results/selection.csv")
    chosen = rows[0]  # ranked by the student's format rate on validation, then the KL gap closed
    ranked = sorted(rows, key=lambda r: (-float(r["student_format_rate"]), -float(r["gap_closed_kl_forward"])))
    assert ranked[0] == chosen
    demo = (ROOT / "genpi/conf/experiment/demo.yaml").read_text()
    assert re.search(rf"override /task: {chosen['task']}\b", demo), "demo.yaml is not the selection's first row"
    assert re.search(rf"override /loss: {chosen['loss']}\b", demo), "demo.yaml is not the selection's first row"
    runner_up = next(r for r in rows if r["task"] != chosen["task"])
    contains(block, f"({chosen['task']}, {LOSS_NAMES[chosen['loss']]})",
             f"{pct(float(chosen['student_format_rate']), 1)}% of {chosen['val_inputs']} inputs",
             f"teacher {pct(float(chosen['teacher_format_rate']))}%", f"floor {pct(float(chosen['floor_format_rate']))}%",
             f"closes {pct(float(chosen['gap_closed_kl_forward']), 1)}% of the KL gap",
             f"{runner_up['task']} with {LOSS_NAMES[runner_up['loss']]}, the best other task, reached "
             f"{pct(float(runner_up['student_format_rate']), 1)}%")


def check_demo_timing(block: str) -> None:
    t = load("experiments/demo/results/timing.json")
    stages = t["first_call_stages_s"]
    held = t["heldout"]
    contains(block, "`experiments/demo/time_demo.sh`", f"the first call took {fixed(t['first_call_s'], 1)} s",
             f"synthesis {stages['synth']} s, training {stages['train']} s, evaluation {stages['eval']} s",
             f"1-minute load {t['load_1min_before']} before", f"the second call took {fixed(t['second_call_s'], 1)} s",
             f"on {held['inputs']} held-out inputs", f"{pct(held['student_format_rate'], 1)}% of the time",
             f"teacher {pct(held['teacher_format_rate'])}%, floor {pct(held['floor_format_rate'])}%",
             f"closes {pct(held['gap_closed_kl_forward'], 1)}% of the KL gap")
    assert t["cores"] == 2
    if "within the 5-minute budget" in block:
        assert t["first_call_s"] <= t["budget_s"] == 300
    assert t["second_call_reused"] and t["second_call_s"] < 60  # the second call reuses the first's results
    # the bar for the demo: the student at least 50% and at least 40 points above the floor
    assert held["student_format_rate"] >= 0.5 and held["student_format_rate"] - held["floor_format_rate"] >= 0.4


def check_onpolicy_pilot(block: str) -> None:
    d = load("experiments/onpolicy_pilot/results/pilot.json")
    g, o = d["runs"]["genpi"], d["runs"]["opcd"]
    assert d["task"] == "os" and d["seed"] == 0 and g["eval/n_examples"] == o["eval/n_examples"]
    contains(block, f"GenPI's fit wall time, {d['opcd_max_time_s']} s", f"On {int(o['eval/n_examples'])} held-out inputs",
             f"follows the format {pct(o['eval/student/format_rate'], 1).removesuffix('.0')}% of the time",
             f"(GenPI {pct(g['eval/student/format_rate'], 1)}%, teacher {pct(o['eval/teacher/format_rate'], 1)}%, "
             f"floor {pct(o['eval/floor/format_rate'])}%)",
             f"closes {pct(o['eval/gap_closed/kl_forward'], 1)}% of the KL gap (GenPI "
             f"{pct(g['eval/gap_closed/kl_forward'], 1)}%)", f"after {o['train/steps']} steps to GenPI's {g['train/steps']}")
    if "did not fix" in block:
        assert o["eval/student/format_rate"] < 0.9 * o["eval/teacher/format_rate"]


def check_onpolicy_selection(block: str) -> None:
    d = load("experiments/onpolicy_pilot/results/selection.json")
    rows, test = d["candidates"], d["test"]
    best = rows[0]
    assert d["chosen"] == best["run"] and d["task"] == "os"
    # the ranking the script states: format rate on validation, then the share of the KL gap closed
    assert rows == sorted(rows, key=lambda r: (-r["val_student_format_rate"], -r["val_gap_closed_kl_forward"]))
    settings = {(r["temperature"], r["lmbda"]) for r in rows}
    assert settings == {(1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.5)}
    if "No candidate's student followed the format on any validation input" in block:
        assert all(r["val_student_format_rate"] == 0 for r in rows)
    contains(block, f"{int(best['val_inputs'])} validation inputs",
             f"temperature {best['temperature']:g} with `lmbda` {best['lmbda']:g} "
             f"({pct(best['val_gap_closed_kl_forward'], 1)}% on validation)",
             f"On the {test['inputs']} held-out inputs that run follows the format "
             f"{pct(test['student_format_rate'], 1).removesuffix('.0')}% of the time and closes "
             f"{pct(test['gap_closed_kl_forward'], 1)}% of the KL gap")


def check_tiny_agent(block: str) -> None:
    record = load("genpi/models/artifacts/tiny_agent.json")
    weights = ROOT / "genpi/models/artifacts/tiny_agent.safetensors"
    rates = record["format_rates"]
    quoted = ", ".join(f"{task} {pct(rates[task]['with_prompt'])}% / {pct(rates[task]['without_prompt'])}%"
                       for task in ("kg", "os", "webshop", "m2w"))  # the README's order
    assert set(rates) == {"kg", "os", "webshop", "m2w"}
    inputs = {r["inputs"] for r in rates.values()}
    assert len(inputs) == 1
    contains(block, f"({millions(record['parameters'])} parameters",
             f"{thousands(record['arch']['vocab_size'])}-token tokenizer",
             f"took {thousands(record['seconds'] / 60)} minutes",
             f"({record['pretrain']['threads']} thread,", f"({thousands(weights.stat().st_size / 2**20)} MB)",
             f"{inputs.pop()} held-out inputs per task", quoted)


def check_teacher_attention(block: str) -> None:
    section = load("experiments/bench/results/bench.json")["teacher_attention"]
    timing = section["timing"]
    shapes = {s["batch_size"] for s in timing.values()}, {s["suffix_tokens"] for s in timing.values()}
    assert len(shapes[0]) == len(shapes[1]) == 1
    contains(block, f"Medians (p25-p75) of {section['rounds']} interleaved rounds, {section['threads']} thread, "
                    f"batch {shapes[0].pop()}, x + y = {shapes[1].pop()} tokens")
    rows = table(block)
    assert len(rows) == sum(len(s["P"]) for s in timing.values())
    for shape_cell, p_cell, naive, cached, shared, bound, share in rows:
        name = shape_cell.split()[0]
        shape = timing[name]["shape"]
        if "(" in shape_cell:
            assert shape_cell == (f"{name} (hidden {thousands(shape['hidden_size'])}, {shape['num_hidden_layers']} "
                                  f"layers, GQA {shape['num_attention_heads']}/{shape['num_key_value_heads']})")
        point = timing[name]["P"][p_cell.replace(",", "")]
        t = point["time"]
        ms = {k: thousands(1000 * t[k]["median_s"]) for k in t}
        assert naive == f"{ms['naive']} ({thousands(1000 * t['naive']['p25_s'])}-" \
                        f"{thousands(1000 * t['naive']['p75_s'])})", (name, p_cell)
        assert cached == f"{ms['cached']} ({sig3(point['cached_speedup'])}x)", (name, p_cell)
        assert shared == f"{ms['shared']} ({sig3(point['shared_speedup'])}x)", (name, p_cell)
        assert bound == f"{sig3(point['flop_bound_speedup'])}x", (name, p_cell)
        naive_spread = t["naive"]["p75_s"] / t["naive"]["p25_s"]
        if point["shared_share_of_flop_bound"] > 1 and naive_spread > 1.5:  # above the bound in noisy rounds
            assert share == "spread too wide to read", (name, p_cell)
        else:
            assert share == f"{pct(point['shared_share_of_flop_bound'])}%", (name, p_cell)


def check_bench_memory(block: str) -> None:
    memory = load("experiments/bench/results/bench_memory.json")["teacher_attention"]["memory"]["wide"]
    batches = sorted(memory["batch"], key=int)
    per_path = {path: " / ".join(fixed(memory["batch"][b][path]["peak_added_mb"], 1) for b in batches) + " MB"
                for path in ("naive", "cached", "shared")}
    shared_last = memory["batch"][batches[-1]]["shared"]["peak_added_mb"] / int(batches[-1])
    contains(block, f"P = {thousands(memory['prompt_tokens'])}", f"batch {' / '.join(batches)}",
             f"naive {per_path['naive']}", f"cached {per_path['cached']}", f"shared {per_path['shared']}",
             f"({fixed(memory['prompt_kv_mb_per_copy'], 1)} MB)", f"(about {fixed(shared_last, 1)} MB per example)")


def check_bench_prose(block: str) -> None:
    """The prose after the bench table: which ratios it singles out (from ``bench.json``)."""
    timing = load("experiments/bench/results/bench.json")["teacher_attention"]["timing"]
    tiny, wide = timing["tiny"]["P"]["4096"], timing["wide"]["P"]["4096"]
    contains(block, f"({fixed(wide['shared_speedup'], 1)}x vs {fixed(wide['cached_speedup'], 1)}x on\nwide and "
                    f"{fixed(tiny['shared_speedup'], 1)}x vs {fixed(tiny['cached_speedup'], 1)}x on tiny at P = 4,096)"
             .replace("\n", " "))
    shares = [timing["wide"]["P"][p]["shared_share_of_flop_bound"] for p in ("1024", "4096")]
    assert min(shares) >= 0.8
    contains(block, "The 80%-of-bound goal is\nmet at P = 1,024 and 4,096 on the wide shape".replace("\n", " "),
             f"({pct(shares[0])}% and {pct(shares[1])}%")


def check_bench_env(block: str) -> None:
    env = load("experiments/environments/results/bench_env.json")["env_episodes"]
    contains(block, f"{env['episodes']} ", f"{fixed(env['speedup'], 1)}x")
    if "ends in round 1" in block:
        assert env["batched"]["rounds_mean"] == env["one_at_a_time"]["rounds_mean"] == 1


def check_onpolicy(block: str) -> None:
    run = load("experiments/bench/results/bench_onpolicy.json")["onpolicy"]
    split, step = run["onpolicy_split_median"], run["step"]
    contains(block, f"batch {run['batch_size']}", f"prompt {thousands(run['prompt_tokens'])} tokens",
             f"input\n{run['input_tokens']}".replace("\n", " "), f"medians of {run['rounds']} interleaved rounds",
             f"off-policy KL step {fixed(step['offpolicy_kl']['median_s'], 2)} s",
             f"on-policy step {fixed(step['onpolicy_kl']['median_s'], 2)} s ({fixed(run['onpolicy_over_offpolicy'], 1)}x)",
             f"sampling {fixed(split['sample_s'], 2)} s ({pct(run['sampling_share_of_onpolicy_step'])}%)",
             f"{fixed(split['score_s'], 2)} s", f"backward {fixed(split['backward_s'], 2)} s",
             f"({fixed(split['sampled_len'], 1)} on")


def check_synth_shards(block: str) -> None:
    speed = load("experiments/synth_shards/results/speedup.json")
    assert speed["shard_card"]["num_shards"] == 2 and speed["datasets_equal"] is True
    contains(block, "2 local shards of 1 thread vs 1 process of 1 thread", f"{fixed(speed['speedup_of_medians'], 2)}x",
             "datasets equal")
    if "medians of" in block:
        import statistics

        contains(block, f"medians of {speed['repeats_done']} alternating runs, "
                        f"{fixed(statistics.median(speed['one_process_seconds']), 1)} s vs "
                        f"{fixed(statistics.median(speed['two_shards_seconds']), 1)} s",
                 f"{speed['records']} os\n  records".replace("\n  ", " "))


def check_env_check(block: str) -> None:
    folder = "experiments/environments/results"
    passed = {}
    for path in glob.glob(str(ROOT / folder / "env_check_*.txt")):
        line = [ln for ln in Path(path).read_text().splitlines() if ln.startswith("passed ")][-1]
        passed[Path(path).stem.removeprefix("env_check_")] = line.removeprefix("passed ")
    rows = {r[0]: r[1:] for r in table(block)}
    for label, key in (("AgentBench OS dev", "agentbench_dev"), ("genpi's own OS problems", "genpi_os")):
        row = next(v for k, v in rows.items() if k.startswith(label))
        total = passed[key].split(" of ")[1]
        assert next(k for k in rows if k.startswith(label)) == f"{label} ({total})"
        assert row == [passed[key], passed[f"{key}_wrong"]], label


def check_sandbox(block: str) -> None:
    rows = {r[0]: r[1] for r in table((ROOT / "experiments/sandbox/results/env_check.md").read_text())}
    assert rows["root"] == rows["unprivileged"]
    contains(block, rows["unprivileged"])


def check_teacher_floor(block: str) -> None:
    summary = load("experiments/environments/results/tiny_agent_teacher_floor.json")["summary"]
    t, f = summary["teacher"], summary["floor"]
    assert t["n"] == f["n"]
    contains(block, f"teacher {t['successes']}/{t['n']} ({pct(t['success_rate'], 1)}%, 95% Wilson "
                    f"{pct(t['success_rate_ci_low'])}-{pct(t['success_rate_ci_high'])}%)",
             f"floor {f['successes']}/{f['n']} ({pct(f['success_rate'], 1)}%, "
             f"{pct(f['success_rate_ci_low'])}-{pct(f['success_rate_ci_high'])}%)",
             f"all {t['n']} of genpi's problems" if t["n"] == 120 else f"the first {t['n']} problems")
    if "the issue's target" in block:  # >= 20% with the prompt, <= 5% without
        assert t["success_rate"] >= 0.2 and f["success_rate"] <= 0.05


def check_tiny_agent_copy(block: str) -> None:
    """The probes' table is gather.py's summary.md, and summary.md follows the result files it is made of."""
    summary = (ROOT / "experiments/tiny_agent_copy/results/summary.md").read_text().strip().splitlines()
    for line in summary:
        assert line in block, line
    val = load("experiments/tiny_agent_copy/results/validation.json")
    rows = {line.split(" | ")[0].strip("| "): line for line in summary[2:]}
    assert set(rows) == set(val)
    for name, row in rows.items():
        fresh, pools = val[name]["fresh"], val[name]["pools"]
        assert f"| {fresh['exact_code']}/{fresh['n']} / {fresh['dir_copied']}/{fresh['dir_inputs']} / " in row, name
        assert f"| {pools['exact_code']}/{pools['n']} / {pools['dir_copied']}/{pools['dir_inputs']} / " in row, name
        env = ROOT / f"experiments/tiny_agent_copy/results/env_{name}.json"
        if env.is_file():
            teacher = load(str(env.relative_to(ROOT)))["summary"]["teacher"]
            assert row.endswith(f"| {teacher['successes']}/{teacher['n']} |"), name
            contains(block, f"succeeds {teacher['successes']} of {teacher['n']} times")


def check_four_task(block: str) -> None:
    """The four-task build: its validation proxies, teacher and floor on genpi's first 40 problems, its record's
    format rates and time."""
    val = load("experiments/tiny_agent_copy/results/validation.json")
    for name in ("four_task", "tokens_5"):
        pools = val[name]["pools"]
        contains(block, f"{pools['exact_code']}/48 / {pools['dir_copied']}/{pools['dir_inputs']}",
                 f"{val[name]['fresh']['exact_code']}/48")
    env = load("experiments/tiny_agent_copy/results/env_four_task.json")["summary"]
    for side in ("teacher", "floor"):
        s = env[side]
        contains(block, f"{pct(s['success_rate'], 1)}% ({s['successes']}/{s['n']}, Wilson "
                        f"{pct(s['success_rate_ci_low'], 1)}-{pct(s['success_rate_ci_high'], 1)}%)")
    card = load("experiments/tiny_agent_copy/results/four_task_card.json")
    for task, r in card["format_rates"].items():
        contains(block, f"{task} {pct(r['with_prompt'], 0)}% / {pct(r['without_prompt'], 0)}%")
    contains(block, f"{card['seconds']:,.0f} s on one thread")


def check_tiny_agent_copy_measure(block: str, probe: str = "pieces_2") -> None:
    """GenPI on a probe that copies: success on genpi's 120 problems per side, and the gaps closed."""
    m = load(f"experiments/tiny_agent_copy/results/measure_{probe}_metrics.json")
    env = m["env"]
    for side in ("teacher", "student", "floor"):
        s = env[side]
        contains(block, f"| {side} | {pct(s['success_rate'], 1)}% ({s['successes']}/{s['n']}) | "
                        f"{pct(s['success_rate_ci_low'], 1)}-{pct(s['success_rate_ci_high'], 1)}% | "
                        f"{pct(m[side]['format_rate'], 1)}% |")
    contains(block, f"closes {pct(env['gap_closed']['success_rate'], 1)}% of the success gap",
             f"{pct(m['gap_closed']['kl_forward'], 1)}% of the KL gap")


def check_serve(block: str) -> None:
    bench = load("experiments/serve/results/serve_bench_prefix_cache_on.json")
    stripped, plain = bench["genpi_serve_stripped"], bench["plain_vllm_full_prompt"]
    contains(block, f"reads {thousands(stripped['prompt_tokens_per_request'])} prompt tokens instead of "
                    f"{thousands(plain['prompt_tokens_per_request'])} ({stripped['tokens_saved_per_request']} saved",
             f"({fixed(stripped['requests_per_s_median'], 2)} vs {fixed(plain['requests_per_s_median'], 2)},")


def check_tokenizers(block: str) -> None:
    models = {m["model"]: m for m in load("experiments/real_tokenizers/results/tokenizers.json")}
    rows = table(block)
    assert {r[0].strip("`").removeprefix("model=") for r in rows} == set(models)
    for name_cell, tokenizer, ids, params, eot in rows:
        m = models[name_cell.strip("`").removeprefix("model=")]
        package, version = m["tokenizer"].split(":")[0].split("==")
        if package in tokenizer:
            assert f"{package} {version}" in tokenizer, name_cell
        assert ids == thousands(m["vocab_size"]), name_cell
        assert params == millions(m["parameters"]), name_cell
        assert eot.strip("`").replace("\\|", "|") == m["end_of_turn"], name_cell


def _study(path: str) -> dict[tuple[str, str], dict[str, float]]:
    """A study of one run per (loss, task)."""
    runs = _seeds(path)
    assert {len(v) for v in runs.values()} == {1}, path
    return {k: v[0] for k, v in runs.items()}


INTERNALIZATION = "experiments/internalization/results/results.csv"
INTERNALIZATION_MD = "experiments/internalization/results/results.md"
STUDY_TABLES = ["eval/student/format_rate", "eval/gap_closed/kl_forward", "eval/env/student/success_rate"]


def _seeds(path: str) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Every run of a study (genpi.aggregate's results.csv) by (loss, task): one entry per seed."""
    out: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in csv_rows(path):
        if r["loss"].startswith(("teacher (", "floor (")):
            continue
        assert r["status"] == "ok", r["run_name"]
        out.setdefault((r["loss"], r["task"]), []).append(
            {k: float(v) for k, v in r.items() if k.startswith(("eval/", "train/"))
             and v not in ("", "True", "False") and not k.endswith("report")})
    return out


def _mean_sd(runs: list[dict[str, float]], key: str) -> tuple[float, float]:
    import statistics

    values = [r[key] for r in runs]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def study_phrases() -> dict[str, str]:
    """The study README's statements of the on-policy targets and of task success, rendered from results.csv."""
    runs = _seeds(INTERNALIZATION)
    fmt, gap, ok = "eval/student/format_rate", "eval/gap_closed/kl_forward", "eval/env/student/success_rate"
    tasks = sorted({t for _, t in runs})
    mean = {(lo, t, k): _mean_sd(v, k)[0] for (lo, t), v in runs.items() for k in (fmt, gap)}
    opcd_os, sd_os = _mean_sd(runs["opcd", "os"], fmt)
    teacher_os = runs["opcd", "os"][0]["eval/teacher/format_rate"]
    genpi_os, genpi_sd = _mean_sd(runs["genpi", "os"], fmt)
    met_os = opcd_os >= 0.9 * teacher_os
    worse = [f"{t} ({'format rate' if mean['opcd', t, fmt] < mean['genpi', t, fmt] else 'KL gap'})" for t in tasks
             if mean["opcd", t, fmt] < mean["genpi", t, fmt] or mean["opcd", t, gap] < mean["genpi", t, gap]]
    out = {
        "os_target": f"On os, at least 90% of the teacher's format rate without the prompt: "
                     f"{'met' if met_os else 'missed'}.",
        "os": f"opcd's student follows the format {pct(opcd_os, 1)}% ± {pct(sd_os, 1)} of the time without the "
              f"prompt (3 seeds), {pct(opcd_os / teacher_os)}% of the teacher's {pct(teacher_os, 1)}% "
              f"(GenPI {pct(genpi_os, 1)}% ± {pct(genpi_sd, 1)})",
        "every": "At least as good as GenPI on format rate and KL gap closed on every task: "
                 + ("met." if not worse else "missed on " + ", ".join(worse) + "."),
        "format": "format rate " + ", ".join(f"{t} {pct(mean['opcd', t, fmt], 1)}% vs {pct(mean['genpi', t, fmt], 1)}%"
                                             for t in tasks),
        "gap": "KL gap closed " + ", ".join(f"{t} {pct(mean['opcd', t, gap], 1)}% vs {pct(mean['genpi', t, gap], 1)}%"
                                            for t in tasks),
    }
    vf = "eval/env/student/endings/validation_failure"
    teacher = runs["genpi", "os"][0]
    success = {lo: (*_mean_sd(runs[lo, "os"], ok), _mean_sd(runs[lo, "os"], vf)[0])
               for lo in ("genpi", "sft", "kl", "opcd", "opcd_turns")}
    out["success"] = ("; ".join(f"{lo} {pct(m, 1)}%" + (f" ± {pct(sd, 1)}" if len(runs[lo, "os"]) > 1 else "")
                                + f" ({fixed(v, 1).removesuffix('.0')} validation failures)"
                                for lo, (m, sd, v) in success.items())
                      + f"; teacher {pct(teacher['eval/env/teacher/success_rate'], 1)}%, floor "
                      f"{pct(teacher['eval/env/floor/success_rate'], 1)}%")
    turns = load("experiments/internalization/results/selection_turns.json")
    out["turns"] = f"{turns['chosen']['turns']} turns, chosen on validation"
    return out


def check_internalization_tables(block: str) -> None:
    """The study README's tables are ``results.md``'s sections (written by gather.sh from the same records as
    results.csv), each possibly without its reference rows."""
    text = (ROOT / INTERNALIZATION_MD).read_text()
    sections = dict(re.findall(r"^### (\S+)\n\n((?:\|.*\n?)+)", text, flags=re.M))
    readme_tables = tables(block)
    assert len(readme_tables) == len(STUDY_TABLES)
    runs = _seeds(INTERNALIZATION)
    for got, key in zip(readme_tables, STUDY_TABLES):
        full = table(sections[key])
        losses = {lo for (lo, t), v in runs.items() if key in v[0]}
        assert got == full[:len(got)] and {r[0] for r in got} >= losses, key
    assert {r["eval/info/n_examples"] for v in runs.values() for r in v} == {32.0}  # the heading's 32
    assert {len(v) for (lo, _), v in runs.items() if lo in ("genpi", "opcd", "opcd_turns")} == {3}  # "3 seeds"
    assert {len(v) for (lo, _), v in runs.items() if lo not in ("genpi", "opcd", "opcd_turns")} == {1}


def check_internalization_selection(block: str) -> None:
    d = load("experiments/internalization/results/selection.json")
    t = load("experiments/internalization/results/selection_turns.json")
    rows = d["candidates"]
    assert rows == sorted(rows, key=lambda r: (-r["val_student_format_rate"], -r["val_gap_closed_kl_forward"]))
    assert d["chosen"] == {"temperature": rows[0]["temperature"], "lmbda": rows[0]["lmbda"]}
    trows = t["candidates"]
    assert trows == sorted(trows, key=lambda r: (-r["val_student_format_rate_later_turns"],
                                                 -r["val_student_format_rate"], -r["val_gap_closed_kl_forward"]))
    assert t["chosen"] == {"turns": trows[0]["turns"]}
    contains(block, f"temperature {d['chosen']['temperature']:g} and `lmbda` {d['chosen']['lmbda']:g}",
             f"{int(rows[0]['val_inputs'])} validation inputs",
             *(f"temperature {r['temperature']:g} / `lmbda` {r['lmbda']:g}: {pct(r['val_student_format_rate'], 1)}%"
               f" and {pct(r['val_gap_closed_kl_forward'], 1)}%" for r in rows),
             *(f"{r['turns']} turns: {pct(r['val_student_format_rate_later_turns'], 1)}% of the later turns "
               f"(teacher {pct(r['val_teacher_format_rate_later_turns'], 1)}%)" for r in trows))


def check_internalization_episodes(block: str) -> None:
    d = load("experiments/internalization/results/os_episodes.json")
    runs = _seeds(INTERNALIZATION)
    for loss in ("kl", "opcd", "opcd_turns", "genpi", "sft"):
        mine = [v for k, v in d["runs"].items() if k.startswith(f"os-{loss}-s")]
        assert len(mine) == len(runs[loss, "os"]), loss  # every os run of the table
        total = {k: sum(v[k] for v in mine) for k in mine[0]}
        assert total["successes"] == round(sum(r["eval/env/student/successes"] for r in runs[loss, "os"]))
        contains(block, f"{loss}: {total['first_action_valid']} of {total['episodes']} first actions valid, "
                        f"{total['validation_failures_after_an_observation']} of {total['validation_failures']} "
                        "validation failures after an observation")
    assert {r["eval/env/teacher/rounds_mean"] for v in runs.values() for r in v if "eval/env/teacher/n" in r} == {2.0}
    ex = d["examples"]["opcd"]
    assert ex["run"] == "os-opcd-s0"
    contains(block, ex["description"], *(" ".join(t["content"].split()) for t in ex["turns"][1:]))


def check_internalization_findings(block: str) -> None:
    contains(block, *study_phrases().values())
    runs = _seeds(INTERNALIZATION)
    trained = ("genpi", "genpi_kl", "kl", "opcd", "opcd_turns", "sft")  # the losses that train without the prompt
    gap = sorted(trained, key=lambda lo: -_mean_sd(runs[lo, "os"], "eval/gap_closed/kl_forward")[0])
    success = sorted(trained, key=lambda lo: _mean_sd(runs[lo, "os"], "eval/env/student/success_rate")[0])
    contains(block, "opcd and kl close the most KL gap on os", "succeeds as often as GenPI's")
    fmt, gap_key = "eval/student/format_rate", "eval/gap_closed/kl_forward"
    tasks = sorted({t for _, t in runs})
    missed = [t for t in tasks if _mean_sd(runs["opcd", t], fmt)[0] < _mean_sd(runs["genpi", t], fmt)[0]]
    if missed:  # "smaller than the spread of opcd's seeds there"
        contains(block, "smaller than the spread of opcd's seeds")
        assert all(_mean_sd(runs["genpi", t], fmt)[0] - _mean_sd(runs["opcd", t], fmt)[0]
                   < _mean_sd(runs["opcd", t], fmt)[1] for t in missed)
    contains(block, "on the KL gap opcd is ahead on every task")
    assert all(_mean_sd(runs["opcd", t], gap_key)[0] > _mean_sd(runs["genpi", t], gap_key)[0] for t in tasks)
    assert set(gap[:2]) == {"opcd", "kl"} and set(success[:2]) == {"opcd", "kl"}
    turns, genpi = (_mean_sd(runs[lo, "os"], "eval/env/student/success_rate") for lo in ("opcd_turns", "genpi"))
    assert abs(turns[0] - genpi[0]) < min(turns[1], genpi[1])  # "as often as": within a standard deviation


def check_internalization_summary(block: str) -> None:
    phrases = study_phrases()
    contains(block, phrases["success"], phrases["os_target"], phrases["every"])


def _range(runs: dict, loss: str, key: str) -> str:
    values = [v[key] for (lo, _), v in runs.items() if lo == loss]
    return f"{pct(min(values))}-{pct(max(values))}%"


def check_ablation(block: str) -> None:
    runs = _study("experiments/ablation/results/results.csv")
    contains(block, f"({len(runs)} jobs)", f"closes {_range(runs, 'kl', 'eval/gap_closed/kl_forward')} of the KL gap")
    assert all(r[f"eval/{who}/format_rate"] == 0 for r in runs.values() for who in ("student", "teacher", "floor"))


CHECKS: dict[str, Callable[[str], None]] = {
    "experiments/demo/results/selection.csv": check_demo_selection,
    "experiments/demo/results/timing.json": check_demo_timing,
    "experiments/onpolicy_pilot/results/pilot.json": check_onpolicy_pilot,
    "experiments/onpolicy_pilot/results/selection.json": check_onpolicy_selection,
    "genpi/models/artifacts/tiny_agent.json": check_tiny_agent,
    "experiments/bench/results/bench.json": lambda block: (check_teacher_attention(block)
                                                           if "| shape |" in block else check_bench_prose(block)),
    "experiments/bench/results/bench_memory.json": check_bench_memory,
    "experiments/environments/results/bench_env.json": check_bench_env,
    "experiments/synth_shards/results/speedup.json": check_synth_shards,
    "experiments/bench/results/bench_onpolicy.json": check_onpolicy,
    "experiments/environments/results/env_check_*.txt": check_env_check,
    "experiments/sandbox/results/env_check.md": check_sandbox,
    "experiments/environments/results/tiny_agent_teacher_floor.json": check_teacher_floor,
    "experiments/tiny_agent_copy/results/summary.md": check_tiny_agent_copy,
    "experiments/tiny_agent_copy/results/measure_pieces_2_metrics.json": check_tiny_agent_copy_measure,
    "experiments/tiny_agent_copy/results/env_four_task.json": check_four_task,
    "experiments/tiny_agent_copy/results/measure_tokens_5_metrics.json":
        lambda block: check_tiny_agent_copy_measure(block, "tokens_5"),
    "experiments/tiny_agent_copy/results/measure_tokens_5_opcd_metrics.json":
        lambda block: check_tiny_agent_copy_measure(block, "tokens_5_opcd"),
    "experiments/serve/results/serve_bench_prefix_cache_on.json": check_serve,
    "experiments/real_tokenizers/results/tokenizers.json": check_tokenizers,
    INTERNALIZATION_MD: check_internalization_tables,
    "experiments/internalization/results/selection.json": check_internalization_selection,
    "experiments/internalization/results/os_episodes.json": check_internalization_episodes,
    f"{INTERNALIZATION}#findings": check_internalization_findings,
    f"{INTERNALIZATION}#summary": check_internalization_summary,
    "experiments/ablation/results/results.csv": check_ablation,
}
MARKED = [(readme, key, text) for readme in READMES for key, text in blocks(readme)]


def test_every_marker_has_a_checker_and_an_artifact_and_every_checker_a_marker():
    keys = {key for _, key, _ in MARKED}
    assert keys - set(CHECKS) == set(), "a README marker without a checker here"
    assert set(CHECKS) - keys == set(), "a checker whose README marker is gone"
    for key in keys:
        assert glob.glob(str(ROOT / key.split("#")[0])), f"{key}: no such committed artifact"


@pytest.mark.parametrize(("readme", "key", "text"), MARKED,
                         ids=[f"{readme}:{key.rsplit('/', 1)[-1]}:{i}" for i, (readme, key, _) in enumerate(MARKED)])
def test_readme_figures_equal_their_artifact(readme, key, text):
    CHECKS[key](text)


def test_no_committed_file_names_this_checkouts_folder():
    """Results are committed and shared: a path of the machine that wrote them (the checkout's absolute folder, or
    any absolute path to a run's outputs folder in a committed result) has no place in them."""
    import shutil
    import subprocess

    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout, or no git")
    proc = subprocess.run(["git", "grep", "-I", "-l", "-F", str(ROOT) + "/"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    assert proc.stdout.split() == [], f"committed files name {ROOT}: {proc.stdout.split()}"
    proc = subprocess.run(["git", "grep", "-I", "-n", "-E", "\"/[^\"]*/outputs/", "--", "experiments/*/results/*"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    assert proc.stdout == "", f"absolute paths of outputs in committed results: {proc.stdout[:500]}"
