"""Lockstep episodes: every running episode advances by one round per batched generation call.

A round is: one ``policy.reply`` call for all running episodes (one batched generation), then every bash action of
the round run concurrently (one thread per shell: the work is in the sandbox processes, not in Python). Up to
``max_running`` episodes are open at once (each holds a sandbox); a finished one is judged, closed, and its slot
taken by the next problem at the start of the next round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from genpi.environments.agents import Policy
from genpi.environments.episode import ENV_ERROR, Episode
from genpi.environments.problems import Problem
from genpi.environments.protocol import EnvText

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    rounds: int = 0
    generation_calls: int = 0
    seconds: float = 0.0
    seconds_generation: float = 0.0
    seconds_shell: float = 0.0
    episodes: int = 0
    extra: dict = field(default_factory=dict)


def _safe(fn: Callable[[], None], ep: Episode, what: str) -> None:
    """Run one episode's machine work; a sandbox failure ends that episode (env_error), never the whole run."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - reported per episode, with its message
        log.warning("episode %s/%s: %s failed: %s", ep.side, ep.problem.id, what, err)
        if not ep.done:
            ep.ending = ENV_ERROR
        ep.reason = f"{what} failed: {type(err).__name__}: {err}"


def run_episodes(jobs: Iterable[tuple[Problem, str]], policy: Policy, sandbox, text: EnvText, round_limit: int = 8,
                 max_running: int = 32, on_done: Callable[[Episode], None] | None = None,
                 stats: RunStats | None = None) -> list[Episode]:
    """Play every ``(problem, side)`` job; returns the finished, judged episodes in the jobs' order.

    Args:
        policy: answers a batch of episodes per round (:class:`genpi.environments.agents.ModelPolicy`, or a
            scripted agent).
        sandbox: opens one fresh machine per episode (:func:`genpi.environments.sandbox.make_sandbox`).
        max_running: episodes open at once (the generation batch of a round; 1 = one episode at a time).
        on_done: called with each episode once it is judged (e.g. to write its line of ``episodes.jsonl``).
    """
    stats = stats if stats is not None else RunStats()
    queue = [Episode(problem=p, side=s, text=text, round_limit=round_limit) for p, s in jobs]
    pending = list(range(len(queue)))
    running: list[int] = []
    t0 = time.perf_counter()
    width = max(1, max_running)
    with ThreadPoolExecutor(max_workers=width) as pool:

        def each(indices: Sequence[int], work: Callable[[int], None], what: str) -> None:
            list(pool.map(lambda i: _safe(lambda: work(i), queue[i], what), indices))

        def finish(indices: Sequence[int]) -> None:
            def end(i: int) -> None:
                ep = queue[i]
                try:
                    if ep.shell is not None and ep.ending != ENV_ERROR:
                        _safe(ep.judge, ep, "judge")
                    else:
                        ep.success = False
                finally:
                    if ep.shell is not None:
                        _safe(ep.shell.close, ep, "close")
                        ep.shell = None
            list(pool.map(end, indices))
            for i in indices:
                if on_done is not None:
                    on_done(queue[i])

        while pending or running:
            # fill free slots: open a fresh machine and reset the episode, concurrently
            new = pending[: width - len(running)]
            pending = pending[len(new):]
            t = time.perf_counter()
            each(new, lambda i: queue[i].reset(sandbox.open()), "reset")
            stats.seconds_shell += time.perf_counter() - t
            running += new
            ended = [i for i in running if queue[i].done]
            if ended:
                finish(ended)
                running = [i for i in running if i not in ended]
                continue
            # one batched generation for the whole round
            t = time.perf_counter()
            replies = policy.reply([queue[i] for i in running])
            stats.seconds_generation += time.perf_counter() - t
            stats.generation_calls += 1
            stats.rounds += 1
            # the round's shell steps, concurrently
            t = time.perf_counter()
            step_of = dict(zip(running, replies))
            each(running, lambda i, replies_of=step_of: queue[i].step(replies_of[i]), "step")
            stats.seconds_shell += time.perf_counter() - t
            ended = [i for i in running if queue[i].done]
            if ended:
                finish(ended)
                running = [i for i in running if i not in ended]
    stats.seconds += time.perf_counter() - t0
    stats.episodes += len(queue)
    return queue
