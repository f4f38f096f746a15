"""genpi's own OS problems, in AgentBench's format, so internalization can be measured as task success on a model
that runs anywhere:

    python -m genpi.environments.genpi_os [--out DIR] [--n 120] [--seed 0]

Every problem is one of the ``os`` task's templates (:func:`genpi.tasks.generators.os_example_with_slots`) filled
from the ``env`` slot split, whose values no other split uses: neither the tiny agent's pre-training corpus nor the
study's synthesis ever held one of these questions. Around each question an ``init`` script (and, for process
questions, a ``start`` script) builds the machine state the question is about, with counts drawn at random; the
evaluation is the template's own reference command (``example``) judged as AgentBench judges: a ``check`` that
compares the agent's answer with the reference's output in the same machine, a ``check`` of the machine's state for
operations, or a ``match`` of a known answer. The folder has AgentBench's layout (``data/dev.json``), so
``genpi-env-check env=genpi_os env.data_dir=DIR`` and ``genpi-eval ... env=genpi_os`` read it as they read
AgentBench's. The default folder is ``<GENPI_OUTPUT_ROOT or outputs>/env/genpi_os``, where ``env=genpi_os`` looks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
from pathlib import Path
from typing import Any

from genpi.tasks.generators import ENV_SPLIT, Slots, os_example_with_slots

# The judge's comparison scripts (python, run as `python3 -c CODE ANSWER REFERENCE_OUTPUT`).
SAME_INTEGER = ("import sys\n"
                "try:\n    sys.exit(0 if int(sys.argv[1].strip()) == int(sys.argv[2].strip()) else 1)\n"
                "except ValueError:\n    sys.exit(1)\n")
LABELS = {0: ["file"], 1: ["file"], 2: ["file", "operation"], 3: ["file", "text"], 4: ["file", "user"],
          5: ["process", "background"], 6: ["permission", "user", "operation"], 7: ["user"], 8: ["file"]}
OTHER_EXT = "orig"


def _q(path: str) -> str:
    return shlex.quote(path)


def _files(paths_and_sizes: list[tuple[str, int]]) -> list[str]:
    """Shell lines that create files of exact byte sizes."""
    return [f"head -c {size} /dev/zero | tr '\\0' x > {_q(p)}" for p, size in paths_and_sizes]


def problem_of(slots: dict[str, Any], question: str, rng: random.Random) -> dict[str, Any]:
    """An AgentBench problem (a JSON object) whose machine state fits the question made from ``slots``."""
    kind, d, ext, f, u = slots["kind"], slots["dir"], slots["ext"], slots["file"], slots["user"]
    code = slots["code"]
    compare = [None, {"language": "python", "code": SAME_INTEGER}]
    init: list[str] = [f"mkdir -p {_q(d)}"]
    start = None
    evaluation: dict[str, Any]
    if kind == 0:  # files with .ext under d, subfolders included
        top, sub = rng.randint(0, 5), rng.randint(1, 5)
        init += [f"mkdir -p {_q(d)}/sub/deeper {_q(d + '/dir.' + ext)}"]
        init += [f"touch {_q(f'{d}/top{i}.{ext}')}" for i in range(top)]
        init += [f"touch {_q(f'{d}/sub/deeper/s{i}.{ext}')}" for i in range(sub)]
        init += [f"touch {_q(f'{d}/decoy{i}.{OTHER_EXT}')}" for i in range(rng.randint(1, 3))]
        evaluation = {"check": compare, "example": code}
    elif kind == 1:  # total size in kilobytes
        init += _files([(f"{d}/part{i}.{ext}", rng.randint(1, 40) * 1024) for i in range(rng.randint(1, 4))])
        evaluation = {"check": compare, "example": code}
    elif kind == 2:  # create a folder and an empty file in it
        target = f"{d}/{slots['name']}/{u}.{ext}"
        evaluation = {"check": [f"test -d {_q(d + '/' + slots['name'])} && test -f {_q(target)} && ! test -s {_q(target)}"],
                      "example": code}
    elif kind == 3:  # lines containing a word
        w = slots["word"]
        lines = ([f"{i} {w} at step {i}" for i in range(rng.randint(1, 9))]
                 + [f"{i} {w}ed and pre{w} are other words" for i in range(rng.randint(1, 4))]
                 + [f"{i} nothing to see" for i in range(rng.randint(1, 6))])
        rng.shuffle(lines)
        init += [f"printf '%s\\n' {' '.join(_q(x) for x in lines)} > {_q(f)}"]
        evaluation = {"check": compare, "example": code}
    elif kind == 4:  # the file's owner
        init += [f"useradd {u}", f"touch {_q(f)} {_q(d + '/other.' + ext)}", f"chown {u} {_q(f)}"]
        evaluation = {"match": u, "example": code}
    elif kind == 5:  # processes with a given name, running in the background
        p, k = slots["proc"], rng.randint(1, 5)
        start = (f"mkdir -p /opt/genpi-bin && cp /bin/sleep /opt/genpi-bin/{p} && "
                 f"for i in $(seq {k}); do /opt/genpi-bin/{p} 100000 & done; sleep 0.2")
        evaluation = {"check": compare, "example": code}
    elif kind == 6:  # only the owner may read and write
        init += [f"useradd {u}", f"echo data > {_q(f)}", f"chown {u} {_q(f)}", f"chmod 644 {_q(f)}"]
        evaluation = {"check": [f"test \"$(stat -c '%a %U' {_q(f)})\" = '600 {u}'"], "example": code}
    elif kind == 7:  # accounts with a login shell
        sh = slots["shell"]
        init += [f"useradd -s {sh} {u}{i}" for i in range(rng.randint(1, 4))]
        evaluation = {"check": compare, "example": code}
    else:  # the largest file directly inside d (a bigger one in a subfolder does not count)
        name = slots["name"]
        others = [n for n in ("alpha", "beta", "gamma") if f"{n}.{ext}" != name]
        sizes = [(f"{d}/{name}", 9000)] + [(f"{d}/{n}.{ext}", rng.randint(100, 8000)) for n in others]
        init += [f"mkdir -p {_q(d + '/nested')}"] + _files(sizes + [(f"{d}/nested/huge.{ext}", 50000)])
        evaluation = {"match": name, "example": code}
    problem: dict[str, Any] = {"description": question, "create": {"local": "default", "init": {"code": "\n".join(init)}},
                               "evaluation": evaluation, "labels": LABELS[kind]}
    if start is not None:
        problem["start"] = start
    return problem


def make_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` problems with distinct questions, deterministic for a seed."""
    rng = random.Random(f"genpi_os:{seed}")
    slots_rng = Slots(random.Random(f"os:{seed}:{ENV_SPLIT}"), ENV_SPLIT)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _ in range(n * 50):
        record, slots = os_example_with_slots(slots_rng)
        question = record["pseudo_input"]
        if question in seen:
            continue
        seen.add(question)
        out.append(problem_of(slots, question, rng))
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct questions in the env split; ask for fewer")
    return out


def write_problems(out_dir: str | Path, n: int = 120, seed: int = 0) -> Path:
    """Write ``data/dev.json`` (AgentBench's layout) into ``out_dir``; returns the file."""
    path = Path(out_dir) / "data" / "dev.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "scripts" / "dev").mkdir(parents=True, exist_ok=True)  # the layout's script folder (unused)
    path.write_text(json.dumps(make_problems(n, seed), indent=1) + "\n")
    return path


def default_dir() -> Path:
    return Path(os.environ.get("GENPI_OUTPUT_ROOT", "outputs")) / "env" / "genpi_os"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m genpi.environments.genpi_os", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder to write (default: <GENPI_OUTPUT_ROOT or outputs>/env/genpi_os)")
    ap.add_argument("--n", type=int, default=120, help="number of problems (default 120)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the slot values and machine states")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    path = write_problems(args.out or default_dir(), args.n, args.seed)
    print(f"wrote {args.n} problems to {path}")


if __name__ == "__main__":
    main()
