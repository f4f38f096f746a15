"""Measure the local sandbox: ``genpi-env-check`` in each arrangement, and what a machine costs.

    python -m genpi.environments.sandbox.measure --data-dir DIR --out experiments/sandbox/results \\
        [--as-user nobody --python /usr/bin/python3 --pythonpath SITE_PACKAGES]

Writes ``env_check.md`` (the command lines, each arrangement's ``passed P of N`` and its failures) and
``sandbox.json`` (the same numbers, and the median seconds to open and close a machine and to run one command).
``--as-user`` runs the check as that user (the unprivileged arrangement a cluster user gets); the interpreter and
the import path must be readable by that user, hence ``--python`` and ``--pythonpath``.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genpi.environments.sandbox.factory import settings_of
from genpi.environments.sandbox.local import LocalSandbox

PASSED = re.compile(r"^passed (\d+) of (\d+)$", re.M)


def env_check(prefix: list[str], python: str, data_dir: str, split: str, env: dict[str, str]) -> dict:
    """Run ``genpi-env-check`` (as ``python -m genpi.env_check``) and read its table and last line."""
    with tempfile.TemporaryDirectory(prefix="genpi-env-check-") as out:
        os.chmod(out, 0o777)  # the unprivileged user writes its episodes there
        argv = prefix + [python, "-m", "genpi.env_check", f"env.data_dir={data_dir}", f"env.split={split}"]
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=out, env={**env, "GENPI_OUTPUT_ROOT": out})
        seconds = time.monotonic() - start
    match = PASSED.search(proc.stdout)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")
                and not line.startswith("| problem")]
    # The command as a reader reruns it: no path of this machine in the results.
    shown = " ".join(argv).replace(data_dir, "DATA_DIR").replace(python, "python" if python == sys.executable
                                                                  else "PYTHON")
    return {"command": shown, "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "passed": int(match.group(1)) if match else None, "problems": int(match.group(2)) if match else None,
            "failures": failures, "stderr_tail": proc.stderr.strip().splitlines()[-3:]}


def machine_costs(privileged: bool, episodes: int = 5, commands: int = 20) -> dict:
    """Median seconds to open+close one machine and to run ``true`` in its shell (the arrangement's overhead)."""
    sandbox = LocalSandbox(settings_of({}), privileged=privileged)
    opens, runs = [], []
    for _ in range(episodes):
        start = time.monotonic()
        with sandbox.open() as shell:
            shell.run("true")
            opened = time.monotonic() - start
            for _ in range(commands):
                t = time.monotonic()
                shell.run("true")
                runs.append(time.monotonic() - t)
        opens.append(opened)
    return {"arrangement": sandbox.arrangement, "open_first_command_s": round(statistics.median(opens), 3),
            "command_round_trip_s": round(statistics.median(runs), 4), "episodes": episodes,
            "commands_per_episode": commands}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="AgentBench's data/os_interaction folder")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--out", required=True, help="folder for env_check.md and sandbox.json")
    parser.add_argument("--as-user", default=None, help="also run the check as this user (unprivileged)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the --as-user run")
    parser.add_argument("--pythonpath", default="", help="extra import path for the --as-user run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    root_env = {"PATH": path, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": os.environ.get("HOME", "/")}
    results = {"split": args.split, "as_user": args.as_user, "load_average": os.getloadavg(), "env_check": {}, "machine": []}
    results["env_check"]["root"] = env_check([], sys.executable, args.data_dir, args.split, root_env)
    if args.as_user:
        here = str(Path(__file__).resolve().parents[3])
        pythonpath = ":".join(p for p in (here, args.pythonpath) if p)
        user = pwd.getpwnam(args.as_user)
        prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                  "--inh-caps=-all", "--bounding-set=-all", "--"]
        user_env = {"PATH": path, "PYTHONPATH": pythonpath, "HOME": "/tmp"}
        results["env_check"]["unprivileged"] = env_check(prefix, args.python, args.data_dir, args.split, user_env)
    for privileged in (True, False):
        results["machine"].append(machine_costs(privileged))
    (out / "sandbox.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# genpi-env-check on AgentBench OS Interaction ({args.split}), local sandbox", "",
             f"Load average while measuring: {', '.join(f'{x:.1f}' for x in results['load_average'])}.", "",
             "| arrangement | passed | seconds |", "| --- | --- | --- |"]
    for name, res in results["env_check"].items():
        lines.append(f"| {name} | {res['passed']} of {res['problems']} | {res['seconds']} |")
    for name, res in results["env_check"].items():
        lines += ["", f"## {name}", "", "```", res["command"], "```", ""]
        lines += ["| problem | labels | ending | reason |", "| --- | --- | --- | --- |"] + res["failures"]
    lines += ["", "## Machine costs (median, measured in this process as root; `unprivileged` is that arrangement's "
              "code path with only root mapped)", "", "| arrangement | open + first command (s) | command round trip (s) |",
              "| --- | --- | --- |"]
    for res in results["machine"]:
        lines.append(f"| {res['arrangement']} | {res['open_first_command_s']} | {res['command_round_trip_s']} |")
    (out / "env_check.md").write_text("\n".join(lines) + "\n")
    print((out / "env_check.md").read_text())


if __name__ == "__main__":
    main()
