"""The ``docker`` backend: one container per episode from AgentBench's image, no network, removed at close.

The image is AgentBench's ``res/dockerfiles/default`` (Ubuntu with python3, pip, git, vim, curl, wget, zip, tree),
built once under the tag ``env.sandbox.docker_image`` from ``env.sandbox.dockerfile`` when the tag is missing. Every
container runs with ``--network none``, a process limit (``--pids-limit``), a memory limit without swap, the
capabilities a container's root keeps minus ``mknod`` and ``net_raw``, and ``no-new-privileges``. The interactive
shell is ``docker exec -it ... bash -i`` on a pseudo-terminal, driven like the local backend's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from genpi.environments.sandbox.local import HOSTNAME, KEPT_CAPS, PATH
from genpi.environments.sandbox.terminal import HOST_ENV, TerminalMachine
from genpi.utils.errors import GenpiError

DAEMON_TIMEOUT_S = 15


def docker_answers() -> str | None:
    """``None`` when a Docker daemon answers ``docker info``; otherwise why not (one line)."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=DAEMON_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`docker info` did not answer within {DAEMON_TIMEOUT_S} s"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"no Docker daemon answers `docker info` ({lines[-1] if lines else f'exit {proc.returncode}'})"
    return None


class DockerShell(TerminalMachine):
    """One container and the interactive shell in it."""

    def __init__(self, settings, image: str):
        super().__init__(settings)
        memory = f"{settings.memory_mb}m"
        argv = ["docker", "run", "-d", "--rm", "--network", "none", "--pids-limit", str(settings.pids_max),
                "--memory", memory, "--memory-swap", memory, "--cap-drop", "ALL"]
        for cap in KEPT_CAPS:
            argv += ["--cap-add", cap.upper()]
        argv += ["--security-opt", "no-new-privileges", "--hostname", HOSTNAME, "--init", "-w", settings.workdir,
                 "-e", f"PATH={PATH}", "-e", "HOME=/root", "-e", "TERM=dumb", "-e", "LANG=C.UTF-8",
                 "--label", "created_by=genpi-sandbox", image, "sleep", "infinity"]
        proc = subprocess.run(argv, capture_output=True, text=True, env=HOST_ENV, timeout=120)
        if proc.returncode != 0:
            raise GenpiError(f"env.backend=docker could not start a container from {image}: "
                             + (proc.stderr.strip().splitlines() or ["no output"])[-1])
        self.container = proc.stdout.strip()

    def _command(self, argv: list[str], terminal: bool) -> list[str]:
        return ["docker", "exec"] + (["-it"] if terminal else []) + ["-w", self.settings.workdir, self.container] + argv

    def _discard(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.container], capture_output=True, env=HOST_ENV, timeout=60)


class DockerSandbox:
    """Opens :class:`DockerShell` containers. ``settings``: :class:`genpi.schema.EnvSandbox`."""

    name = "docker"

    def __init__(self, settings):
        self.settings = settings
        why = docker_answers()
        if why is not None:
            raise GenpiError(f"env.backend=docker: {why}; start a Docker daemon, or use env.backend=local")
        self.image = settings.docker_image
        inspect = subprocess.run(["docker", "image", "inspect", self.image], capture_output=True, env=HOST_ENV)
        if inspect.returncode != 0:
            self._build()

    def _build(self) -> None:
        if self.settings.dockerfile is None:
            raise GenpiError(
                f"env.backend=docker: the image {self.settings.docker_image} does not exist; set "
                "env.sandbox.dockerfile=<AgentBench>/data/os_interaction/res/dockerfiles/default to build it")
        dockerfile = Path(self.settings.dockerfile)
        if not dockerfile.is_file():
            raise GenpiError(f"env.sandbox.dockerfile={self.settings.dockerfile} is not a file: point it at "
                             "AgentBench's data/os_interaction/res/dockerfiles/default")
        proc = subprocess.run(["docker", "build", "-t", self.image, "-f", str(dockerfile), str(dockerfile.parent)],
                              capture_output=True, text=True, env=HOST_ENV)
        if proc.returncode != 0:
            raise GenpiError(f"env.backend=docker: building {self.image} from {dockerfile} failed: "
                             + (proc.stderr.strip().splitlines() or ["no output"])[-1])

    def open(self) -> DockerShell:
        return DockerShell(self.settings, self.image)
