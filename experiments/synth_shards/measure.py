"""Sharded synthesis against one process, the same dataset, measured side by side in one run.

    .venv/bin/python experiments/synth_shards/measure.py                      # writes results/speedup.json
    .venv/bin/python experiments/synth_shards/measure.py --inputs 16 --repeats 1   # a quick look

Each repeat runs, in alternation so that both see the same machine load:

- ``one``: ``genpi-synth`` as one process with one thread (``OMP_NUM_THREADS=1``);
- ``shards``: ``genpi-synth -m hydra/launcher=local synth.num_shards=2 synth.shard=0,1``: two jobs of one
  thread each, started by submitit's local launcher (what a Slurm array does on a cluster), the last one merging.

Times are wall-clock seconds of the whole command (interpreter start, model load, every stage, the merge), as a
user waits for them; the speed-up is the ratio of the medians. The two datasets must be equal (greedy decoding),
or the script fails. The machine's load average is recorded beside the figures: on a shared machine the second
core may be busy with other work, which caps the speed-up below 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"


def workload(inputs: int, tokens: int, turns: int) -> list[str]:
    """Every later stage on the tiny model, greedy, inputs drawn from the os task's templates."""
    return [
        "task=os", "model=tiny", "synth.stages=[pseudo_inputs,outputs,reasons,conversations]",
        "synth.pseudo_inputs.source=templates", f"synth.pseudo_inputs.num_inputs={inputs}",
        f"synth.outputs.sampling.max_tokens={tokens}", f"synth.reasons.sampling.max_tokens={tokens}",
        f"synth.conversations.sampling.max_tokens={tokens}", f"synth.conversations.env_sampling.max_tokens={tokens}",
        f"synth.conversations.max_turns={turns}", "synth.chunk_size=16", "synth.progress=false",
    ]


def timed(args: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "genpi.synth", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"genpi-synth {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def records(root: Path) -> list[dict[str, Any]]:
    (data,) = list(root.glob("synth/*/*/*/data.jsonl"))
    return [json.loads(line) for line in data.read_text().splitlines()]


def card(root: Path) -> dict[str, Any]:
    (path,) = list(root.glob("synth/*/*/*/card.json"))
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=64, help="pseudo inputs (records) per dataset")
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens per answer, reason and turn")
    ap.add_argument("--turns", type=int, default=2, help="agent turns per role-swapped conversation")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating")
    ap.add_argument("--json", type=Path, default=RESULTS / "speedup.json", help="where the figures go")
    args = ap.parse_args(argv)

    from genpi.models.tiny import build_tiny

    build_tiny()  # built once before timing: neither mode pays for it
    work = workload(args.inputs, args.tokens, args.turns)
    one, shards, loads, cards = [], [], [], {}
    scratch = Path(tempfile.mkdtemp(prefix="genpi-synth-shards-"))
    for r in range(args.repeats):
        loads.append(os.getloadavg()[0])
        root_one, root_two = scratch / f"one-{r}", scratch / f"shards-{r}"
        one.append(timed([f"paths.output_root={root_one}", *work]))
        shards.append(timed(["-m", "hydra/launcher=local", f"paths.output_root={root_two}", *work,
                             "synth.num_shards=2", "synth.shard=0,1"]))
        if records(root_one) != records(root_two):
            raise SystemExit(f"repeat {r}: the sharded dataset differs from the unsharded one ({root_two})")
        cards = {"one": card(root_one), "shards": card(root_two)}
        print(f"repeat {r}: one process {one[-1]:.1f} s, 2 shards {shards[-1]:.1f} s", flush=True)
        write(args, argv, work, one, shards, loads + [os.getloadavg()[0]], cards)  # each repeat, in case of a stop


def write(args, argv, work, one: list[float], shards: list[float], loads: list[float],
          cards: dict[str, Any]) -> None:
    result = {
        "what": "genpi-synth wall time: 1 process x 1 thread vs 2 local shards (submitit) x 1 thread, same dataset",
        "command": "python experiments/synth_shards/measure.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "workload": work,
        "records": cards["one"]["records"],
        "repeats_done": len(one),
        "one_process_seconds": one,
        "two_shards_seconds": shards,
        "speedup_of_medians": round(statistics.median(one) / statistics.median(shards), 3),
        "datasets_equal": True,
        "shard_card": cards["shards"]["shards"],
        "one_process_stage_seconds": {k: round(v.get("seconds") or 0, 2) for k, v in cards["one"]["stages"].items()},
        "load_average_1min": loads,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median: one process {statistics.median(one):.1f} s, 2 shards {statistics.median(shards):.1f} s, "
          f"speed-up {result['speedup_of_medians']:.2f}x -> {args.json}")


if __name__ == "__main__":
    main()
