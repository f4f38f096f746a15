"""results/summary.md: one row per candidate, from results/probe_*.json, results/validation.json and, for the
candidate played in the environment, results/env_*.json. python experiments/tiny_agent_copy/gather.py"""
import json
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
RECIPES = {  # candidate: (what it was trained on, what it started from)
    "shipped": ("tiny_agent's own corpus (4 tasks, pool slot values, lr 3e-3)", "random"),
    "pools": ("os corpus, pool slot values, 900 steps, lr 3e-3", "random"),
    "fresh2": ("os corpus, made-up syllable values, 900 + 1,500 steps, lr 3e-3", "random"),
    "drill_then_lr3e-3": ("copy drill 900 steps, then os corpus (made-up syllables) + drill, 900 steps, lr 3e-3", "random"),
    "drill_then_lr1e-3": ("copy drill 900 steps, then os corpus (made-up syllables) + drill, 1,200 steps, lr 1e-3", "random"),
    "words_1": ("drill_then_lr1e-3, then genpi's made-up values (half real words) + drill, 1,200 steps, lr 1e-3", "drill_then_lr1e-3"),
    "words_2": ("words_1, then 1,500 more steps of the same", "words_1"),
    "words_2_drill3": ("words_1, then 1,500 more steps, the drill 3 steps in 7 instead of 1 in 5", "words_1"),
    "words_3": ("words_2_drill3, then 3,000 more steps of the same", "words_2_drill3"),
    "vocab_1": ("words_2, then 1,500 steps with the drill also over the whole vocabulary (drill 3 steps in 7)", "words_2"),
    "pieces_1": ("words_3, then values of 1-3 vocabulary pieces (builder's fresh_values=pieces), observations ending "
                 "in a newline, their drill 3 steps in 7, 1,500 steps", "words_3"),
    "pieces_2": ("pieces_1, then 1,500 more steps of the same (new inputs)", "pieces_1"),
    "tokens_1": ("copy drill of values of 1-3 random vocabulary tokens, 900 steps, then the os corpus of such values + "
                 "their drill (1 step in 5), 1,500 steps, lr 1e-3", "random"),
    "tokens_2": ("tokens_1, then 1,500 more steps (new inputs)", "tokens_1"),
    "tokens_3": ("tokens_2, then 1,500 more steps (new inputs)", "tokens_2"),
    "tokens_4": ("tokens_3, then 1,500 more steps (new inputs)", "tokens_3"),
    "tokens_5": ("tokens_4, then 1,500 more steps (new inputs)", "tokens_4"),
    "four_task": ("genpi's builder, four_task.json: copy drill of vocabulary-piece values 1,500 steps of 32, then the "
                  "four tasks' corpus (os 4:1, its values made-up pieces, newline observations) + drill 3 steps per "
                  "cycle, 11,400 steps, lr 1e-3", "random"),
}


def cell(proxy: dict | None) -> str:
    return f"{proxy['exact_code']}/{proxy['n']}" if proxy else "n/a"


def triple(v: dict) -> str:
    return f"{v['exact_code']}/{v['n']} / {v['dir_copied']}/{v['dir_inputs']} / {v['format_with']}/{v['n']}"


def main() -> None:
    val = json.loads((RES / "validation.json").read_text())
    rows = ["| candidate | recipe | validation, made-up values: exact command / directory carried / format | "
            "validation, pool values: exact / directory / format | env-split proxy: exact command | "
            "genpi's problems: teacher success |", "|---|---|---|---|---|---|"]
    for name, (recipe, _start) in RECIPES.items():
        if name not in val:
            continue
        probe = RES / f"probe_{name}.json"
        env = RES / f"env_{name}.json"
        success = "not played"
        if env.is_file():
            t = json.loads(env.read_text())["summary"]["teacher"]
            success = f"{t['successes']}/{t['n']}"
        rows.append(f"| {name} | {recipe} | {triple(val[name]['fresh'])} | {triple(val[name]['pools'])} | "
                    f"{cell(json.loads(probe.read_text()) if probe.is_file() else None)} | {success} |")
    (RES / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
