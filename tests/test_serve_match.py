"""Prompt recognition of genpi-serve, without a server: what is stripped, what is not, and why.

The prompt is AgentBench's own OS prompt (``../shared/agentbench/os.prompt.txt``, skipped when absent) and genpi's
built-in webshop prompt (whose open turn is empty) and a one-turn plain-text prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from genpi.serving.prompt_match import PromptMatcher, normalize, strip_prefix, strip_suffix
from genpi.tasks.base import Task, build_task, builtin_task
from genpi.tasks.transcript import render_transcript

AGENTBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "agentbench"
PROBLEM = 'tell me how many files are in the directory "/usr/lib"?'


@pytest.fixture(scope="module")
def os_task() -> Task:
    path = AGENTBENCH / "os.prompt.txt"
    if not path.is_file():
        pytest.skip("../shared/agentbench/os.prompt.txt is absent")
    return build_task(**{**_os_cfg(), "prompt_path": str(path)})


def _os_cfg() -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "genpi" / "conf" / "task" / "os.yaml")
    return OmegaConf.to_container(cfg)


def agentbench_first_request(task: Task, problem: str) -> list[dict]:
    """An OS episode's first request as AgentBench builds it: the transcript's turns, then the open turn's text,
    a blank line and the problem in one user message."""
    head, lead = task.prompt_turns[:-1], task.prompt_turns[-1]["content"]
    return [dict(t) for t in head] + [{"role": "user", "content": f"{lead}\n\n{problem}"}]


def test_normalize_collapses_only_spaces_tabs_newlines():
    assert normalize("  a \t\n b\n\nc  ") == "a b c"
    assert normalize("a\u00a0b") == "a\u00a0b"  # a no-break space is not forgiven
    assert strip_prefix("Now, my problem is:\n\n  x y ", "Now, my\tproblem is:") == "x y"
    assert strip_prefix("My problem isn't", "My problem is") is None  # the prompt may not end inside a word
    assert strip_prefix("My problem is:x", "My problem is:") == "x"
    assert strip_suffix("x y\n Answer: ", "Answer:") == "x y"
    assert strip_suffix("x yAnswer:", "Answer:") is None


def test_agentbench_request_is_stripped_to_the_student_view(os_task):
    matcher = PromptMatcher(os_task)
    decision = matcher.strip(agentbench_first_request(os_task, PROBLEM))
    assert decision.action == "stripped" and decision.form == "turns"
    assert decision.messages == os_task.student_messages(PROBLEM)
    # later rounds keep their turns after the stripped one
    later = agentbench_first_request(os_task, PROBLEM) + [{"role": "assistant", "content": "Act: bash"},
                                                          {"role": "user", "content": "The output of the OS:\n3"}]
    assert matcher.strip(later).messages == os_task.student_messages(PROBLEM) + later[-2:]


def test_whitespace_differences_are_forgiven_and_nothing_else(os_task):
    matcher = PromptMatcher(os_task)
    messages = agentbench_first_request(os_task, PROBLEM)
    spaced = [{**m, "content": "\n  " + m["content"].replace(" ", " \t ").replace("\n", "\n\n") + "  \n"}
              for m in messages]
    assert matcher.strip(spaced).action == "stripped"
    assert matcher.strip(spaced).messages[0]["content"] == PROBLEM.replace(" ", " \t ")
    # one word changed in the first turn, in a middle turn, or the case of one letter: not stripped, said so
    first = messages[0]["content"]
    for edited in ([{**messages[0], "content": first.replace("linux(ubuntu)", "linux(debian)")}] + messages[1:],
                   messages[:4] + [{**messages[4], "content": messages[4]["content"].replace("220", "221")}]
                   + messages[5:],
                   [{**messages[0], "content": first.replace("You are", "you are")}] + messages[1:]):
        decision = matcher.strip(edited)
        assert decision.action == "differs" and decision.messages is edited
    assert "'linux(debian)'" in matcher.strip([{**messages[0], "content": first.replace("linux(ubuntu)",
                                                                                         "linux(debian)")}]).detail
    # a role changed (the first turn sent as system) is not the transcript either
    assert matcher.strip([{**messages[0], "role": "system"}] + messages[1:]).action != "stripped"


def test_merged_system_and_first_user_forms(os_task):
    matcher = PromptMatcher(os_task)
    turns = os_task.prompt_turns
    joined = "\n\n".join(t["content"] for t in turns)
    rendered = render_transcript(turns)
    for system in (joined, rendered):
        decision = matcher.strip([{"role": "system", "content": system}, {"role": "user", "content": PROBLEM}])
        assert (decision.action, decision.form) == ("stripped", "system")
        assert decision.messages == os_task.student_messages(PROBLEM)
    head_only = "\n".join(t["content"] for t in turns[:-1])
    decision = matcher.strip([{"role": "system", "content": head_only},
                              {"role": "user", "content": f"{turns[-1]['content']} {PROBLEM}"}])
    assert decision.action == "stripped" and decision.messages == os_task.student_messages(PROBLEM)
    decision = matcher.strip([{"role": "user", "content": f"{rendered}\n\n{PROBLEM}"}])
    assert (decision.action, decision.form) == ("stripped", "first_user")
    assert decision.messages == os_task.student_messages(PROBLEM)
    # OpenAI's list-of-parts content is read as its text
    parts = [{"role": "system", "content": [{"type": "text", "text": joined}]},
             {"role": "user", "content": [{"type": "text", "text": PROBLEM}]}]
    assert matcher.strip(parts).action == "stripped"


def test_requests_without_the_prompt_pass_unchanged(os_task):
    matcher = PromptMatcher(os_task)
    plain = [{"role": "user", "content": PROBLEM}]
    decision = matcher.strip(plain)
    assert decision.action == "absent" and decision.messages is plain
    # another task's prompt is not this one: forwarded, and flagged as a prompt that differs
    other = builtin_task("webshop")
    webshop = [dict(t) for t in other.prompt_turns[:-1]] + [{"role": "user", "content": "i need a red shirt"}]
    decision = matcher.strip(webshop)
    assert decision.action == "differs" and decision.messages is webshop


def test_teacher_mode_injects_the_prompt_as_genpi_teacher_sees_it(os_task):
    matcher = PromptMatcher(os_task)
    decision = matcher.inject([{"role": "user", "content": f"  {PROBLEM}\n"}])
    assert decision.action == "injected"
    assert decision.messages == os_task.teacher_messages(PROBLEM)
    full = agentbench_first_request(os_task, PROBLEM)
    assert matcher.inject(full).action == "present" and matcher.inject(full).messages is full


def test_teacher_template_text_around_the_input_is_part_of_the_match():
    task = Task(name="t", prompt_turns=[{"role": "user", "content": "Answer in French.\nQuestion:"}],
                teacher_template="<q>{input}</q> Answer:", student_template="Q: {input}")
    matcher = PromptMatcher(task)
    decision = matcher.strip([{"role": "user", "content": "Answer in French. Question: <q>why?</q>  Answer:"}])
    assert decision.action == "stripped" and decision.messages == [{"role": "user", "content": "Q: why?"}]
    assert matcher.strip([{"role": "user", "content": "Answer in French. Question: <q>why?</q>"}]).action != "stripped"


def test_empty_open_turn_strips_whole_turns():
    # AgentBench's webshop and m2w transcripts end with an empty user turn: the input is that whole message
    task = Task(name="t", prompt_turns=[{"role": "user", "content": "You shop. Answer with search[...] or click[...]."},
                                        {"role": "assistant", "content": "Action:\nsearch[dryer sheets]"},
                                        {"role": "user", "content": ""}])
    matcher = PromptMatcher(task)
    request = [dict(t) for t in task.prompt_turns[:-1]] + [{"role": "user", "content": "i need a red shirt"}]
    decision = matcher.strip(request)
    assert (decision.action, decision.form) == ("stripped", "turns")
    assert decision.messages == [{"role": "user", "content": "i need a red shirt"}]
    assert matcher.strip(request[1:]).action == "absent"


def test_serve_config_defaults_agree_with_the_schema_and_bad_values_are_named():
    from omegaconf import OmegaConf

    from genpi import schema
    from genpi.utils.errors import GenpiError

    yaml = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "genpi" / "conf" / "serve.yaml"))
    assert yaml["serve"] == schema.defaults(schema.Serve)
    for bad, named in (({"port": 0}, "serve.port=0"), ({"mode": "coach"}, "serve.mode='coach'"),
                       ({"mode": "teacher", "adapter": "a"}, "serve.mode='teacher'"),
                       ({"adapter": "a", "merged": "m"}, "serve.merged='m'")):
        with pytest.raises(GenpiError, match=re.escape(named)):
            schema.read(bad, schema.Serve, "serve")
