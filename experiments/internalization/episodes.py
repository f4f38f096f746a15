"""Where the os runs' students fail on genpi's OS problems, from their episodes (each run's evaluation folder,
episodes.jsonl): per run, the student's episodes whose first action is valid, the validation failures and how many
of them came after the first observation; and one trajectory per loss, chosen by rule (seed 0's first problem, in
the problems' numbered order, whose student episode ended in a validation failure after an observation). Writes
OUT as JSON; a run whose evaluation folder is gone (the records came from another machine) keeps its entry of OUT.
    python experiments/internalization/episodes.py RECORDS OUT"""
import json
import re
import sys
from pathlib import Path

records, out = Path(sys.argv[1]), Path(sys.argv[2])
old = json.loads(out.read_text()) if out.is_file() else {"runs": {}, "examples": {}}
runs, examples = dict(old["runs"]), dict(old["examples"])
for metrics in sorted(records.glob("os-*/metrics.json")):
    name = metrics.parent.name
    m = json.loads(metrics.read_text())
    episodes = Path(m["eval/report"]).parent / "episodes.jsonl"
    if "eval/env/student/n" not in m or not episodes.is_file():
        continue
    student = sorted((e for e in map(json.loads, episodes.read_text().splitlines()) if e["side"] == "student"),
                     key=lambda e: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", e["problem"])])
    late = [e for e in student if e["ending"] == "validation_failure" and e["rounds"] >= 2]
    runs[name] = {"episodes": len(student), "successes": sum(e["success"] for e in student),
                  "first_action_valid": sum(bool(e["actions"] and e["actions"][0].get("kind")) for e in student),
                  "validation_failures": sum(e["ending"] == "validation_failure" for e in student),
                  "validation_failures_after_an_observation": len(late)}
    loss = json.loads((metrics.parent / "run.json").read_text())["config"]["loss"]["name"]
    if name.endswith("-s0") and late:
        e = late[0]
        examples[loss] = {"run": name, "problem": e["problem"], "description": e["description"], "turns": e["turns"]}
    elif name.endswith("-s0"):
        examples.pop(loss, None)
out.write_text(json.dumps({"command": "experiments/internalization/episodes.py", "runs": runs,
                           "examples": examples}, indent=2) + "\n")
print(f"{len(runs)} runs: {out}")
