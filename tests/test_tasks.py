"""Tasks: prompt files (the paper's AgentBench transcripts, plain text), teacher/student views, pseudo-input
parsers on realistic generator outputs, and each task's format check on valid and invalid answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpi.tasks import parsers
from genpi.tasks.base import TASK_NAMES, build_task, builtin_task
from genpi.tasks.transcript import load_prompt_file, parse_transcript, render_transcript
from genpi.utils.errors import GenpiError

AGENTBENCH = Path(__file__).resolve().parents[2] / "shared" / "agentbench"


@pytest.mark.parametrize("name", ["os", "webshop", "m2w", "kg"])
def test_agentbench_transcripts_import_as_turns(name):
    path = AGENTBENCH / f"{name}.prompt.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    turns = load_prompt_file(path)
    roles = [t["role"] for t in turns]
    assert roles[0] == "user" and "assistant" in roles and set(roles) <= {"user", "assistant", "system"}
    assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate
    assert roles[-1] == "user"  # the open turn the task input completes
    assert parse_transcript(render_transcript(turns)) == turns
    task = build_task(name=name, prompt_path=str(path), parser=None)
    x = "How many files are in /tmp?"
    teacher, student = task.teacher_messages(x), task.student_messages(x)
    assert teacher[-1]["content"].endswith(x) and len(teacher) == len(turns)
    assert student == [{"role": "user", "content": x}]
    assert 1000 < len(task.prompt_text) and task.prompt_id == build_task(name=name, prompt_path=str(path)).prompt_id


def test_plain_text_prompt_and_bad_prompt_files(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("You are a careful shell agent. Answer with Think and Act.\n")
    task = build_task(name="x", prompt_path=str(plain), parser=None)
    assert task.prompt_turns == [{"role": "user", "content": "You are a careful shell agent. Answer with Think and Act."}]
    assert task.teacher_messages("ls?")[-1]["content"].endswith("\nls?")
    empty = tmp_path / "empty.txt"
    empty.write_text("<USER>:\n\n<AGENT>:\n")
    with pytest.raises(GenpiError, match="no turns"):
        load_prompt_file(empty)
    with pytest.raises(GenpiError, match="not found"):
        load_prompt_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_builtin_prompts_are_realistic(name, tiny_tokenizer):
    task = builtin_task(name)
    n_tokens = len(tiny_tokenizer(task.prompt_text)["input_ids"])
    assert 500 <= n_tokens <= 1500, n_tokens
    assert any(t["role"] == "assistant" for t in task.prompt_turns)  # one worked example
    assert task.env_persona.strip() and task.end_token in task.env_persona and task.format == name
    env = task.env_messages("find x", [{"role": "assistant", "content": "Act: finish"}])
    assert env[0]["role"] == "system" and env[1] == {"role": "user", "content": "Act: finish"}


GENERATOR_OUTPUTS = {
    "os": ("Sure! Here are 3 new tasks for the agent:\n\n1. Count the number of .log files in /var/log.\n"
           "2. \"Find the largest file in /home/alice and print its size.\"\n3. Which user has UID 1001?\n"
           "   Answer with the user name only.\n\nI hope these help!",
           ["Count the number of .log files in /var/log.", "Find the largest file in /home/alice and print its size.",
            "Which user has UID 1001?\n   Answer with the user name only."]),
    "webshop": ("- i need a pair of red running shoes, size 9, price lower than 60.00 dollars\n"
                "- find me a bamboo cutting board under 25 dollars\n",
                ["i need a pair of red running shoes, size 9, price lower than 60.00 dollars",
                 "find me a bamboo cutting board under 25 dollars"]),
    "kg": ("Here are new questions:\n1) Question: who directed the film Rashomon?\nEntities: [Rashomon]\n"
           "2) Question: what instruments did Miles Davis play?\nEntities: [Miles Davis]",
           ["Question: who directed the film Rashomon?\nEntities: [Rashomon]",
            "Question: what instruments did Miles Davis play?\nEntities: [Miles Davis]"]),
    "m2w": ("Here are two inputs.\n###\n'''\n<html> <button id=0> Search </button> </html>\n'''\nTask: Find a hotel.\n"
            "###\n'''\n<html> <a id=1> Deals </a> </html>\n'''\nTask: Look up deals.\n",
            ["'''\n<html> <button id=0> Search </button> </html>\n'''\nTask: Find a hotel.",
             "'''\n<html> <a id=1> Deals </a> </html>\n'''\nTask: Look up deals."]),
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_parsers_read_realistic_generator_outputs(name):
    text, want = GENERATOR_OUTPUTS[name]
    assert builtin_task(name).parse_pseudo_inputs(text) == want
    assert builtin_task(name).parse_pseudo_inputs("I cannot help with that.") == []


def test_json_list_parser_and_dedup_normalization():
    assert parsers.parse_json_list('Here:\n```json\n["a task", "another one", 3]\n```') == ["a task", "another one", "3"]
    assert parsers.parse_json_list("no list here") == []
    assert parsers.normalize_for_dedup("  Count  FILES\nin /tmp ") == parsers.normalize_for_dedup("count files in /tmp")


FORMATS = {
    "os": (["Think: I count them.\n\nAct: bash\n\n```bash\nls /tmp | wc -l\n```", "Think: Done.\n\nAct: finish",
            "Think: The output is 4.\n\nAct: answer(4)"],
           ["You can run ls to see the files.", "Think: x\n\nAct: bash\n\n```bash\n```",
            "Think: x\nAct: finish\nAct: answer(3)", "Act: finish", "Think: x\n\nAct: answer()"]),
    "webshop": (["Thought:\nI search first.\n\nAction:\nsearch[red running shoes]", "Action:\nclick[b09xyz1234]"],
                ["Try a big online store.", "Action:\nsearch[]", "Action:\nsearch[a] then click[b]"]),
    "m2w": (["Thought: the box.\nAnswer: C.\nAction: TYPE\nValue: Brooklyn", "Answer: B.\nAction: CLICK",
             "Answer: A."],
            ["Go to the website and search.", "Answer: C.\nAction: TYPE", "Answer: B.\nAction: HOVER"]),
    "kg": (["Thought: relations first.\nAction: get_relations(Barack Obama)", "Action: get_neighbors(#0, people.person.spouse_s)",
            "Thought: #1 is it.\nFinal Answer: #1"],
           ["Barack Obama was married to Michelle.", "Action: get_neighbors(#0)", "Action: fly(#0)",
            "Action: count(#0)\nAction: count(#1)"]),
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_format_checks_accept_valid_and_refuse_invalid_answers(name):
    task = builtin_task(name)
    valid, invalid = FORMATS[name]
    assert [task.check_format(a) for a in valid] == [True] * len(valid)
    assert [task.check_format(a) for a in invalid] == [False] * len(invalid)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_data_answers_follow_their_format(name):
    from genpi.data.records import load_records

    task = builtin_task(name)
    records = load_records(task.sample_data_path())
    assert len(records) >= 64
    assert all(task.check_format(r["teacher_output_single"]) for r in records)
    assert not any(task.check_format(r["student_output_single"]) for r in records)
