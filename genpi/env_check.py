"""genpi-env-check: play every problem of an environment's split with a scripted agent through the real sandbox,
the episode loop and the judge, and say which problems fail and why (``python -m genpi.env_check env.data_dir=...``).

The reference agent should pass every problem the machine can host; the wrong-answer replay (``check.agent=wrong``)
should pass none. The last line printed is ``passed P of N``. See ``conf/env_check.yaml``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from genpi.utils import hydra_utils  # noqa: F401  (registers the genpi_* resolvers the configs use)
from genpi.utils.errors import GenpiError

log = logging.getLogger("genpi.env_check")
AGENTS = ("reference", "wrong")


def run_check(cfg: DictConfig, out=sys.stdout) -> dict[str, Any]:
    """Play the split with the scripted agent; print the failures and ``passed P of N``; return the counts."""
    from genpi.environments import results
    from genpi.environments.agents import ReferencePolicy, WrongPolicy
    from genpi.environments.evaluate import problems_of, read_settings, sandbox_cfg, text_of
    from genpi.environments.runner import run_episodes
    from genpi.environments.sandbox import make_sandbox
    from genpi.utils.wrappers import run_dir_of

    env, _ = read_settings(cfg)
    agent = str(cfg.check.agent)
    if agent not in AGENTS:
        raise GenpiError(f"check.agent={agent!r} is not allowed: one of {', '.join(AGENTS)}")
    max_running = int(cfg.check.max_running)
    if max_running < 1:
        raise GenpiError(f"check.max_running={max_running} is not allowed: >= 1")
    problems = problems_of(env)
    sandbox = make_sandbox(sandbox_cfg(env), env.backend)
    out_dir = run_dir_of(cfg)
    episodes_log = results.EpisodeLog(Path(out_dir) / "episodes.jsonl")
    policy = ReferencePolicy() if agent == "reference" else WrongPolicy()
    episodes = run_episodes([(p, agent) for p in problems], policy, sandbox, text_of(env), env.round_limit,
                            max_running, on_done=episodes_log)
    failed = [ep for ep in episodes if not ep.success]
    passed = len(episodes) - len(failed)
    shown = episodes_log.path
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    print(f"{env.name} {env.split}: {len(problems)} problems from {env.data_dir}, {agent} agent, "
          f"{env.backend} sandbox; episodes in {shown}", file=out)
    if failed:
        print("| problem | labels | ending | reason |", file=out)
        print("| --- | --- | --- | --- |", file=out)
        for ep in failed:
            reason = (ep.reason or "").replace("|", "/").replace("\n", " ")
            print(f"| {ep.problem.id} | {','.join(ep.problem.labels)} | {ep.ending} | {reason} |", file=out)
    print(f"passed {passed} of {len(episodes)}", file=out, flush=True)
    return {"passed": passed, "n": len(episodes), "failed": [ep.problem.id for ep in failed]}


@hydra.main(version_base="1.3", config_path="conf", config_name="env_check")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_check(cfg)
    except GenpiError as err:
        print(f"genpi: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
