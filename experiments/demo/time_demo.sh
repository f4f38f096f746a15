#!/usr/bin/env bash
# How long `make demo` takes on a fresh machine: `make demo` (install already done) with an empty genpi cache
# (GENPI_CACHE: the shipped tiny_agent weights are copied in and checked, nothing is reused) and an empty output
# root, then the same command again (it must reuse what the first wrote). Writes results/timing.json: wall time of
# each call, each stage's time as the pipeline printed it, the load average before and after, the commit, and the
# report's held-out figures (format rates, share of the gaps closed).
set -euo pipefail
cd "$(dirname "$0")/../.."
make install >/dev/null
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
load_before=$(cut -d' ' -f1 /proc/loadavg)
run() {
  local start end
  start=$(date +%s.%N)
  GENPI_CACHE="$scratch/cache" GENPI_OUTPUT_ROOT="$scratch/outputs" make demo >"$scratch/$1.log" 2>&1
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}
first=$(run first)
load_after=$(cut -d' ' -f1 /proc/loadavg)
second=$(run second)
.venv/bin/python - "$scratch" "$first" "$second" "$load_before" "$load_after" <<'EOF'
import json, re, subprocess, sys, time
from pathlib import Path

scratch, first, second, before, after = sys.argv[1:]
def stages(name):
    text = (Path(scratch) / f"{name}.log").read_text()
    return {m[0]: int(m[1]) for m in re.findall(r"=== genpi (\w+): done in (\d+)s", text)}, text
s1, t1 = stages("first")
s2, t2 = stages("second")
out = {
    "command": "experiments/demo/time_demo.sh",
    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "cores": len(__import__("os").sched_getaffinity(0)),
    "load_1min_before": float(before), "load_1min_after_first": float(after),
    "first_call_s": round(float(first), 1), "first_call_stages_s": s1,
    "second_call_s": round(float(second), 1), "second_call_stages_s": s2,
    # the scratch folder is this machine's: named, not written
    "second_call_reused": [ln.strip().replace(scratch, "<scratch>") for ln in t2.splitlines()
                           if "reus" in ln.lower()][:6],
    "budget_s": 300,
}
# the figures of the demo's report (its held-out test split), from the evaluation's metrics.json
(metrics,) = Path(scratch, "outputs", "eval").glob("*/metrics.json")
m = json.loads(metrics.read_text())
out["heldout"] = {"inputs": m["n_examples"], **{f"{who}_format_rate": m[who]["format_rate"]
                                                for who in ("teacher", "student", "floor")},
                  "gap_closed_kl_forward": m["gap_closed"]["kl_forward"]}
Path("experiments/demo/results/timing.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
EOF
