"""A cgroup per episode: bounds the number of processes (``pids.max``) and the memory of everything the episode runs.

A process-count rlimit does not bind a root user (``RLIMIT_NPROC`` is ignored with ``CAP_SYS_RESOURCE`` and counts
per uid over the whole host), so the sandbox relies on the ``pids`` controller. Both cgroup v1 (one hierarchy per
controller) and v2 (the unified hierarchy) are handled. The episode's cgroups are created *below* the cgroup this
process already lives in, so whatever limits its own cgroup has (a Slurm job's, a container's) still hold.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from genpi.utils.errors import GenpiError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """``{controller: path of this process's cgroup}`` from /proc/self/cgroup; ``""`` keys the v2 hierarchy."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            paths[""] = path
        for name in controllers.split(","):
            if name:
                paths[name] = path
    return paths


def _v1_dir(controller: str, path: str) -> Path | None:
    base = CGROUP_ROOT / controller
    if (base / "cgroup.procs").exists():
        return base / path.lstrip("/")
    return None


def _v2_dir(path: str) -> Path | None:
    for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if (base / "cgroup.controllers").exists():
            controllers = (base / path.lstrip("/") / "cgroup.controllers")
            if controllers.exists() and "pids" in controllers.read_text().split():
                return base / path.lstrip("/")
    return None


class EpisodeCgroup:
    """The cgroup(s) of one episode. ``procs_files`` are what a process writes its pid to in order to join.

    ``pids_max``: processes and threads at once; ``memory_bytes``: resident memory plus tmpfs pages (the
    sandbox's file writes live on a tmpfs, charged to the writer).
    """

    def __init__(self, pids_max: int, memory_bytes: int):
        own = _own_paths()
        name = f"genpi-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dirs: list[Path] = []
        pids_v1 = _v1_dir("pids", own.get("pids", "/")) if "pids" in own else None
        if pids_v1 is not None:
            pids_dir = self._make(pids_v1 / name)
            (pids_dir / "pids.max").write_text(str(pids_max))
            memory_v1 = _v1_dir("memory", own.get("memory", "/")) if "memory" in own else None
            if memory_v1 is not None:
                try:
                    memory_dir = self._make(memory_v1 / name)
                    (memory_dir / "memory.limit_in_bytes").write_text(str(memory_bytes))
                    swap = memory_dir / "memory.memsw.limit_in_bytes"
                    if swap.exists():
                        swap.write_text(str(memory_bytes))
                except OSError:
                    pass  # memory stays bounded by the tmpfs size and the parent's limit
        else:
            v2 = _v2_dir(own.get("", "/"))
            if v2 is None:
                raise GenpiError(
                    "env.backend=local needs a cgroup with the pids controller to bound the sandbox's processes, and "
                    f"none is writable under {CGROUP_ROOT}: run where cgroups can be created (a Slurm job with "
                    "cgroup delegation, a privileged container), or use env.backend=docker")
            self._enable_v2(v2)
            group = self._make(v2 / name)
            (group / "pids.max").write_text(str(pids_max))
            if (group / "memory.max").exists():
                (group / "memory.max").write_text(str(memory_bytes))
                if (group / "memory.swap.max").exists():
                    (group / "memory.swap.max").write_text("0")
        self.procs_files = [d / "cgroup.procs" for d in self.dirs]

    def _make(self, path: Path) -> Path:
        self._remove_stale(path.parent)
        try:
            path.mkdir()
        except OSError as err:
            self.remove()
            raise GenpiError(
                f"env.backend=local cannot create the episode's cgroup {path} ({err.strerror}): run as root or "
                "where cgroups are delegated to you, or use env.backend=docker") from None
        self.dirs.append(path)
        return path

    @staticmethod
    def _remove_stale(parent: Path) -> None:
        """Remove empty episode cgroups left by a genpi process that died (their machines died with it)."""
        try:
            entries = list(parent.glob("genpi-sandbox-*"))
        except OSError:
            return
        for entry in entries:
            owner = entry.name.split("-")[2]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                try:
                    entry.rmdir()
                except OSError:
                    pass

    @staticmethod
    def _enable_v2(parent: Path) -> None:
        control = parent / "cgroup.subtree_control"
        enabled = control.read_text().split()
        for name in ("pids", "memory"):
            if name not in enabled:
                try:
                    control.write_text(f"+{name}")
                except OSError:
                    if name == "pids":
                        raise GenpiError(
                            f"env.backend=local cannot enable the pids controller in {parent} (the cgroup holds "
                            "processes itself): start genpi in a cgroup of its own, or use env.backend=docker"
                        ) from None

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found.update(int(x) for x in procs.read_text().split())
            except (OSError, ValueError):
                pass
        return sorted(found)

    def kill_all(self, deadline_s: float = 10.0) -> None:
        """SIGKILL every process in the cgroup until none is left (a fork bomb keeps forking while it is killed)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        for path in reversed(self.dirs):
            for _ in range(100):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)  # the last killed processes are still being reaped
        self.dirs = []
