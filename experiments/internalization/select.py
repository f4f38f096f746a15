"""On-policy distillation's settings for the study, chosen on the VALIDATION split: among the candidates' records
NAME... under RECORDS (record.py; each run trained with one candidate's sampling temperature and on-policy share,
evaluated with eval.split=val), the best student format rate, ties broken by the larger share of the KL gap closed.
Writes OUT (every candidate's validation figures and the choice) and prints the chosen settings as overrides.
With --by later_turns (candidates that differ in loss.kl.sampling.turns, evaluated with eval.turns above 1): the best
student format rate on the conversations' later agent turns, ties broken as above; prints the chosen turns.
    python experiments/internalization/select.py [--by later_turns] RECORDS OUT NAME [NAME ...]"""
import json
import sys
from pathlib import Path

args = sys.argv[1:]
later = args[:2] == ["--by", "later_turns"]
if later:
    args = args[2:]
records, out, names = Path(args[0]), Path(args[1]), args[2:]
rows = []
for name in names:
    record = records / name
    if not (record / "record.json").is_file():
        raise SystemExit(f"{record}: no record of candidate {name} (run.sh writes it when the candidate's run finishes)")
    m = json.loads((record / "metrics.json").read_text())
    kl = json.loads((record / "run.json").read_text())["config"]["loss"]["kl"]
    split = json.loads((record / "record.json").read_text())["split"]
    if split != "val":  # never choose on the held-out inputs
        raise SystemExit(f"{record}: evaluated on the {split!r} split, not the validation split")
    if later and "eval/student/format_rate_later_turns" not in m:
        raise SystemExit(f"{record}: no format rate of later turns (evaluate with eval.turns above 1)")
    rows.append({"run": name, "temperature": kl["sampling"]["temperature"], "lmbda": kl["lmbda"],
                 "turns": kl["sampling"].get("turns", 1),
                 "val_student_format_rate_later_turns": m.get("eval/student/format_rate_later_turns"),
                 "val_teacher_format_rate_later_turns": m.get("eval/teacher/format_rate_later_turns"),
                 "steps": m.get("train/steps"), "val_inputs": m.get("eval/n_examples"),
                 "val_student_format_rate": m["eval/student/format_rate"],
                 "val_teacher_format_rate": m["eval/teacher/format_rate"],
                 "val_gap_closed_kl_forward": m["eval/gap_closed/kl_forward"]})
if not rows:
    raise SystemExit("name the candidates' runs")
# later turns first when asked; then the first answers' format rate; then the share of the KL gap closed
rows.sort(key=lambda r: ((-r["val_student_format_rate_later_turns"],) if later else ())
          + (-r["val_student_format_rate"], -r["val_gap_closed_kl_forward"]))
best = rows[0]
rule = ("best validation student format rate" + (" on the later turns, then on the first answers" if later else "")
        + ", ties: larger share of the KL gap closed")
chosen = {"turns": best["turns"]} if later else {"temperature": best["temperature"], "lmbda": best["lmbda"]}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"command": "experiments/internalization/run.sh (step " + ("5" if later else "3") + ")",
                           "rule": rule, "candidates": rows, "chosen": chosen}, indent=2) + "\n")
OVERRIDE = {"temperature": "loss.kl.sampling.temperature", "lmbda": "loss.kl.lmbda", "turns": "loss.kl.sampling.turns"}
print(" ".join(f"{OVERRIDE[k]}={v}" for k, v in chosen.items()))
