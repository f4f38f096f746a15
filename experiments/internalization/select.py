"""On-policy distillation's settings for the study, chosen on the VALIDATION split: among the candidates' records
NAME... under RECORDS (record.py; each run trained with one candidate's sampling temperature and on-policy share,
evaluated with eval.split=val), the best student format rate, ties broken by the larger share of the KL gap closed.
Writes OUT (every candidate's validation figures and the choice) and prints the chosen settings as overrides.
    python experiments/internalization/select.py RECORDS OUT NAME [NAME ...]"""
import json
import sys
from pathlib import Path

records, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = []
for name in names:
    record = records / name
    if not (record / "record.json").is_file():
        raise SystemExit(f"{record}: no record of candidate {name} (run.sh step 3 writes it)")
    m = json.loads((record / "metrics.json").read_text())
    kl = json.loads((record / "run.json").read_text())["config"]["loss"]["kl"]
    split = json.loads((record / "record.json").read_text())["split"]
    if split != "val":  # never choose on the held-out inputs
        raise SystemExit(f"{record}: evaluated on the {split!r} split, not the validation split")
    rows.append({"run": name, "temperature": kl["sampling"]["temperature"], "lmbda": kl["lmbda"],
                 "steps": m.get("train/steps"), "val_inputs": m.get("eval/n_examples"),
                 "val_student_format_rate": m["eval/student/format_rate"],
                 "val_teacher_format_rate": m["eval/teacher/format_rate"],
                 "val_gap_closed_kl_forward": m["eval/gap_closed/kl_forward"]})
if not rows:
    raise SystemExit("name the candidates' runs")
rows.sort(key=lambda r: (-r["val_student_format_rate"], -r["val_gap_closed_kl_forward"]))
best = rows[0]
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"command": "experiments/internalization/run.sh (step 3)", "rule": "best validation student "
                           "format rate, ties: larger share of the KL gap closed", "candidates": rows,
                           "chosen": {"temperature": best["temperature"], "lmbda": best["lmbda"]}}, indent=2) + "\n")
print(f"loss.kl.sampling.temperature={best['temperature']} loss.kl.lmbda={best['lmbda']}")
