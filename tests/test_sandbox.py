"""The sandbox for agents' commands: confinement first (the canary), then each bad command, then shell semantics.

The ``local`` backend needs root, util-linux and a writable cgroup; where those are missing its tests skip with the
reason. The destructive tests take the ``confined`` fixture, which is the canary: if the canary fails they do not
run. The ``docker`` backend's tests skip when no Docker daemon answers.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from genpi.environments.sandbox import Sandbox, Shell, ShellResult, make_sandbox
from genpi.utils.errors import GenpiError

HOST_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/usr/bin/bash")


def _local_unavailable() -> str | None:
    if os.name != "posix" or not Path("/proc/self/ns/user").exists():
        return "the local sandbox needs Linux namespaces"
    try:
        make_sandbox({}, "local")
    except GenpiError as err:
        return str(err)
    return None


LOCAL_SKIP = _local_unavailable()
needs_local = pytest.mark.skipif(LOCAL_SKIP is not None, reason=f"local sandbox unavailable: {LOCAL_SKIP}")


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    """One local sandbox (settings shared by the module); each test opens its own episode from it."""
    if LOCAL_SKIP is not None:
        pytest.skip(f"local sandbox unavailable: {LOCAL_SKIP}")
    return make_sandbox({"command_timeout": 20, "episode_timeout": 120, "output_limit": 4096, "pids_max": 64,
                         "memory_mb": 256, "tmpfs_mb": 256}, "local")


@pytest.fixture(scope="module")
def host_state():
    """Digests of host files that no episode may change, taken before any episode ran."""
    return {path: digest(path) for path in HOST_FILES if os.path.exists(path)}


@pytest.fixture(scope="module")
def confined(sandbox, host_state):
    """The canary: a file in the host's /tmp and a marker in the host's /root survive ``rm -rf`` of both inside.

    Destructive tests take this fixture: when the canary fails they error out without running.
    """
    name, token = uuid.uuid4().hex, uuid.uuid4().hex  # the content differs from the name printed in errors
    host_tmp = Path(f"/tmp/genpi-canary-{name}")
    host_root = Path(f"/root/.genpi-canary-{name}")
    host_tmp.write_text(token)
    host_root.write_text(token)
    try:
        with sandbox.open() as shell:
            seen = shell.run(f"cat {host_tmp} {host_root} 2>&1; ls -A /root /tmp")
            assert token not in seen.output, "the host's /tmp or /root is visible inside the sandbox"
            wiped = shell.run(f"rm -rf {host_tmp} {host_root} /tmp /root; ls -A /tmp /root 2>&1")
            assert wiped.exit_code is not None and not wiped.timed_out
            assert shell.run("ls -d /root /tmp").exit_code != 0  # gone inside ...
        assert host_tmp.read_text() == token  # ... and untouched outside
        assert host_root.read_text() == token
        yield host_state
    finally:
        host_tmp.unlink(missing_ok=True)
        host_root.unlink(missing_ok=True)


def assert_host_untouched(host_state) -> None:
    for path, before in host_state.items():
        assert digest(path) == before, f"{path} changed on the host"


def test_canary_proves_confinement(confined):
    assert_host_untouched(confined)


def test_interface(sandbox):
    with sandbox.open() as shell:
        assert isinstance(sandbox, Sandbox) and isinstance(shell, Shell)
        result = shell.run("echo hello; exit_status_probe() { return 3; }; exit_status_probe")
        assert result == ShellResult(output="hello\n", exit_code=3, timed_out=False, truncated=False)


def test_state_persists_across_runs(sandbox):
    with sandbox.open() as shell:
        assert shell.run("mkdir -p /srv/work && cd /srv/work && export GREETING=hi && COUNT=41").exit_code == 0
        assert shell.run("echo $PWD $GREETING $((COUNT + 1))").output == "/srv/work hi 42\n"
        started = shell.run("sleep 60 & echo $! > /tmp/job.pid")
        assert started.exit_code == 0
        jobs = shell.run("jobs -l; kill -0 $(cat /tmp/job.pid) && echo alive")
        assert "sleep 60" in jobs.output and jobs.output.endswith("alive\n")


def test_fresh_state_per_episode(sandbox, host_state):
    with sandbox.open() as shell:
        assert shell.run("useradd -m alice && echo data > /root/notes && touch /etc/episode-one").exit_code == 0
        assert "alice" in shell.run("getent passwd alice").output
    with sandbox.open() as shell:
        assert shell.run("getent passwd alice").exit_code == 2  # no such user
        assert shell.run("ls -d /root/notes /etc/episode-one /home/alice 2>/dev/null | wc -l").output == "0\n"
    assert "alice:" not in Path("/etc/passwd").read_text()
    assert_host_untouched(host_state)


def test_scripts_run_in_the_same_machine(sandbox):
    """init/check scripts (``execute``) see what the agent's shell did, and get their arguments."""
    with sandbox.open() as shell:
        shell.run("cd /tmp && echo 7 > answer.txt")
        check = shell.execute(["bash", "-c", 'test "$(cat /tmp/answer.txt)" = "$1" && echo "match $1"', "--", "7"])
        assert check == ShellResult("match 7\n", 0, False, False)
        py = shell.execute(["python3", "-c", "import sys; print(sys.argv[1:]); sys.exit(4)", "a b", "c"])
        assert py.output == "['a b', 'c']\n" and py.exit_code == 4
        assert shell.run("pwd").output == "/tmp\n"  # scripts do not move the interactive shell


@pytest.mark.slow  # about 30 s: rm leaves a whiteout in the overlay for each of the host's ~140k files under /usr
def test_rm_rf_root_leaves_host_untouched(sandbox, confined):
    with sandbox.open() as shell:
        result = shell.run("rm -rf --no-preserve-root / 2>/dev/null; echo done", timeout=110)
        # About 30 s on an idle 2-core machine; on a saturated one the episode's limit may end it first.
        completed = result.exit_code == 0 and result.output.endswith("done\n") and not result.timed_out
        assert completed or (result.timed_out and result.exit_code is None)
        if completed:  # the machine itself is wiped (the shell lives on in memory: builtins only)
            assert shell.run("[ -e /usr/bin/bash ] || [ -e /etc/passwd ] || echo wiped").output == "wiped\n"
    assert_host_untouched(confined)
    assert Path("/usr/bin/bash").exists() and Path("/root").is_dir()


def test_writes_under_root_and_etc_stay_inside(sandbox, confined):
    token = uuid.uuid4().hex
    with sandbox.open() as shell:
        result = shell.run(f"echo {token} > /root/{token} && echo {token} >> /etc/passwd && "
                           f"echo {token} > /etc/{token} && echo 'x::0:0::/:/bin/sh' >> /etc/passwd && "
                           f"tail -1 /etc/passwd")
        assert result.exit_code == 0 and result.output == "x::0:0::/:/bin/sh\n"  # writable inside
    assert not Path(f"/root/{token}").exists() and not Path(f"/etc/{token}").exists()
    assert token not in Path("/etc/passwd").read_text()
    assert_host_untouched(confined)


def test_kill_all_processes_ends_only_the_sandbox(sandbox, confined):
    host_process = subprocess.Popen(["sleep", "60"])
    try:
        with sandbox.open() as shell:
            shell.run("sleep 600 &")
            # bash's builtin kill spares the shell that runs it (as on any machine): the background job dies.
            builtin = shell.run("kill -9 -1; sleep 0.2; jobs -l; pgrep -fc 'sleep 600' || true", timeout=10)
            assert builtin.exit_code == 0 and builtin.output.endswith("0\n")
            shell.run("sleep 600 &")
            # An external kill takes the shell with it: the command ends without a status ...
            external = shell.run("/bin/kill -9 -1", timeout=10)
            assert external.exit_code is None and not external.timed_out
            # ... and the next command gets a fresh shell in the same machine.
            after = shell.run("echo fresh shell; pgrep -fc 'sleep 600' || true")
            assert after.output == "fresh shell\n0\n" and after.exit_code == 0
        assert host_process.poll() is None
    finally:
        host_process.kill()
        host_process.wait()
    assert_host_untouched(confined)


def test_fork_bomb_is_bounded(sandbox, confined):
    with sandbox.open() as shell:
        result = shell.run(":(){ :|:& };:", timeout=5)
        assert result.exit_code is not None or result.timed_out
        time.sleep(1)
        count = len(shell.cgroup.pids())
        assert 0 < count <= 64  # pids.max of the episode's cgroup
        assert subprocess.run(["true"]).returncode == 0  # the host can still fork
    assert shell.cgroup.dirs == [] and shell.cgroup.pids() == []  # every process killed, the cgroup removed
    assert_host_untouched(confined)


def test_sleep_forever_times_out_and_the_shell_lives_on(sandbox):
    with sandbox.open() as shell:
        shell.run("cd /var; sleep 300 &")
        start = time.monotonic()
        result = shell.run("sleep 100000", timeout=1.0)
        assert result.timed_out and result.exit_code is None
        assert time.monotonic() - start < 6
        after = shell.run("pwd; jobs")
        assert after.output.startswith("/var\n") and "sleep 300" in after.output  # background job survives


def test_endless_output_is_cut(sandbox):
    with sandbox.open() as shell:
        result = shell.run("yes", timeout=1.5)
        assert result.timed_out and result.truncated
        assert 4000 <= len(result.output) <= 4096 and set(result.output) == {"y", "\n"}
        assert shell.run("echo next").output == "next\n"


def test_environment_is_clean_and_secrets_masked(sandbox, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("GENPI_TEST_API_KEY", secret)
    with sandbox.open() as shell:
        env = shell.run("env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'")
        assert secret not in env.output and "GENPI_TEST_API_KEY" not in env.output
        names = {line.split("=", 1)[0] for line in shell.run("env").output.splitlines()}
        assert names <= {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "HOSTNAME", "PWD", "SHLVL", "_",
                         "OLDPWD"}
        from genpi.environments.sandbox.local import hidden_entries

        hidden = " ".join(f"/{rel}" for rel in hidden_entries())  # what the host keeps from other users
        if hidden:
            assert shell.run(f"ls -d {hidden} 2>/dev/null | wc -l").output == "0\n"
        hashes = shell.run("cut -d: -f2 /etc/shadow /etc/gshadow | sort -u").output.split()
        assert set(hashes) <= {"*", "!", "!*", ""}, "password hashes are visible"
        assert shell.run("ls -A /root").output.split() == sorted(os.listdir("/etc/skel"))
        # the host's home folders are masked (an empty /home), not copied: a marker made there now is not seen
        marker = None
        if os.access("/home", os.W_OK):
            marker = Path(tempfile.mkdtemp(prefix="genpi-host-home-", dir="/home"))
        try:
            with sandbox.open() as fresh:
                assert fresh.run("ls -A /home").output.split() == []
        finally:
            if marker is not None:
                marker.rmdir()
        capabilities = shell.run("grep CapBnd /proc/self/status").output.split()[1]
        assert int(capabilities, 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN, even inside the user namespace
        assert shell.run("echo 1 > /proc/sys/kernel/sysrq").exit_code != 0  # host-wide knobs read-only
        # The kernel's host-wide files that this kernel has are the null device inside (checked without writing).
        present = [n for n in ("sysrq-trigger", "kcore", "kmsg", "keys", "timer_list") if Path(f"/proc/{n}").exists()]
        assert present, "none of the masked /proc files exists on this kernel: nothing to check"
        kinds = shell.run("stat -c '%t,%T' " + " ".join(f"/proc/{n}" for n in present)).output.split()
        assert kinds == ["1,3"] * len(present)
        assert shell.run("ls /work /boot 2>/dev/null | wc -l").output == "0\n"  # nothing else of the host


def test_no_network(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        with sandbox.open() as shell:
            probe = ("import socket\n"
                     f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
                     "    try:\n"
                     "        socket.create_connection(addr, 2); print('reached', addr)\n"
                     "    except OSError as err:\n"
                     "        print('unreachable', addr[0])\n")
            result = shell.run(f"python3 -c {shlex_quote(probe)}; ls /sys/class/net")
            assert "reached" not in result.output
            assert result.output.count("unreachable") == 3 and result.output.endswith("lo\n")
    finally:
        server.close()


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


@needs_local
def test_episode_wall_time_limit():
    short = make_sandbox({"command_timeout": 1, "episode_timeout": 2}, "local")
    with short.open() as shell:
        assert shell.run("sleep 5").timed_out
        shell.run("sleep 5")
        over = shell.run("echo too late")
        assert over == ShellResult("", None, True, False)


@needs_local
def test_memory_limit():
    small = make_sandbox({"memory_mb": 64}, "local")
    with small.open() as shell:
        result = shell.run("python3 -c 'x = bytearray(256 * 2**20); print(len(x))'; echo status $?", timeout=30)
        assert "268435456" not in result.output and result.output.split()[-1] != "0"


def test_bad_settings_fail_in_one_line():
    with pytest.raises(GenpiError, match=r"^env\.sandbox\.backend='podman' is not allowed: one of local, docker$"):
        make_sandbox({"backend": "podman"})
    with pytest.raises(GenpiError, match=r"command_timeout=900.0 is not allowed: <= env\.sandbox\.episode_timeout"):
        make_sandbox({"command_timeout": 900})
    with pytest.raises(GenpiError, match=r"^env\.backend='podman'"):
        make_sandbox({}, "podman")


# --- docker backend ------------------------------------------------------------------------------------------------
def _docker_unavailable() -> str | None:
    from genpi.environments.sandbox.docker import docker_answers

    return docker_answers()


def test_docker_backend_names_the_problem_without_a_daemon():
    why = _docker_unavailable()
    if why is None:
        pytest.skip("a Docker daemon answers: the docker tests below cover the backend")
    with pytest.raises(GenpiError, match="env.backend=docker: .*use env.backend=local"):
        make_sandbox({}, "docker")


@pytest.fixture(scope="module")
def docker_sandbox():
    why = _docker_unavailable()
    if why is not None:
        pytest.skip(f"docker backend not tested: {why}")
    dockerfile = Path(__file__).resolve().parents[2] / "shared/agentbench/os_interaction/res/dockerfiles/default"
    return make_sandbox({"dockerfile": str(dockerfile) if dockerfile.exists() else None, "command_timeout": 20,
                         "output_limit": 4096}, "docker")


def test_docker_state_and_fresh_episode(docker_sandbox):
    with docker_sandbox.open() as shell:
        shell.run("cd /tmp && X=5 && sleep 60 &")
        assert shell.run("cd /tmp && X=5").exit_code == 0
        assert shell.run("echo $PWD $X").output == "/tmp 5\n"
        assert shell.execute(["bash", "-c", "touch /root/mark; echo $1", "--", "arg"]).output == "arg\n"
    with docker_sandbox.open() as shell:
        assert shell.run("ls /root/mark 2>/dev/null || echo none").output == "none\n"


def test_docker_limits(docker_sandbox):
    with docker_sandbox.open() as shell:
        assert shell.run("sleep 100000", timeout=1).timed_out
        cut = shell.run("yes", timeout=1)
        assert cut.truncated and len(cut.output) <= 4096
        net = shell.run("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), 2)\"")
        assert net.exit_code != 0


@needs_local
@pytest.mark.slow  # about 5-13 s: each machine pre-creates ~16k upper-layer directories
def test_unprivileged_arrangement_runs_the_problems_operations(host_state):
    """The arrangement a user without root gets (own uid mapped to root, /etc copied, upper directories
    pre-created), here as root with only root mapped: useradd, a new command in /usr/local/bin, a background job."""
    from genpi.environments.sandbox.factory import settings_of
    from genpi.environments.sandbox.local import LocalSandbox

    unprivileged = LocalSandbox(settings_of({"command_timeout": 20}), privileged=False)
    assert unprivileged.arrangement == "unprivileged"
    with unprivileged.open() as shell:
        assert shell.run("cat /proc/self/uid_map").output.split() == ["0", "0", "1"]
        made = shell.run("useradd -m -G root carol && printf 'echo calc' > /usr/local/bin/calc-probe && "
                         "chmod +x /usr/local/bin/calc-probe && calc-probe && (sleep 30 &) && id -u carol")
        assert made.exit_code == 0 and made.output.startswith("calc\n")
        assert shell.run("getent shadow carol | cut -d: -f2").output == "!\n"  # useradd wrote the copied shadow
    assert not Path("/usr/local/bin/calc-probe").exists() and "carol:" not in Path("/etc/passwd").read_text()
    assert_host_untouched(host_state)


FAKE_DOCKER = r"""#!/bin/bash
# A stand-in for the docker client: logs its arguments; `exec` runs the command here, in a scratch folder.
echo "$*" >> "$FAKE_DOCKER_LOG"
case "$1" in
  info) echo 27.0 ;;
  image|build|rm) exit 0 ;;
  run) echo fake-container ;;
  exec)
    shift; tty=0; workdir=/
    while [[ "$1" == -* ]]; do
      case "$1" in -it) tty=1 ;; -w) shift; workdir="$1" ;; esac; shift
    done
    shift  # the container
    cd "$FAKE_DOCKER_ROOT"
    if [ $tty = 1 ]; then exec setsid -w -c "$@"; else exec "$@"; fi ;;
esac
"""


def test_docker_backend_drives_its_client(tmp_path, monkeypatch):
    """The docker backend against a stand-in client (no daemon here): the container's flags (no network, limits,
    dropped capabilities), the interactive shell through ``docker exec -it``, scripts, timeouts, removal."""
    from genpi.environments.sandbox import docker as docker_backend
    from genpi.environments.sandbox import terminal

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    (tmp_path / "root").mkdir()
    log = tmp_path / "docker.log"
    path = f"{bin_dir}:{terminal.HOST_ENV['PATH']}"
    monkeypatch.setenv("PATH", path)
    host_env = {"PATH": path, "FAKE_DOCKER_LOG": str(log), "FAKE_DOCKER_ROOT": str(tmp_path / "root")}
    monkeypatch.setattr(terminal, "HOST_ENV", host_env)
    monkeypatch.setattr(docker_backend, "HOST_ENV", host_env)
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))

    sandbox = make_sandbox({"command_timeout": 10, "pids_max": 99, "memory_mb": 300, "output_limit": 2048}, "docker")
    with sandbox.open() as shell:
        assert shell.run("cd sub 2>/dev/null || mkdir sub && cd sub; X=7").exit_code == 0
        assert shell.run("echo ${PWD##*/} $X").output == "sub 7\n"
        interrupted = shell.run("sleep 100000", timeout=1)
        assert interrupted.timed_out and interrupted.exit_code is None
        assert shell.run("echo alive").output == "alive\n"
        assert shell.execute(["bash", "-c", 'echo "$1"', "--", "the answer"]).output == "the answer\n"
    calls = log.read_text().splitlines()
    run = next(c for c in calls if c.startswith("run "))
    for flag in ("--network none", "--pids-limit 99", "--memory 300m", "--memory-swap 300m", "--cap-drop ALL",
                 "no-new-privileges", "--rm"):
        assert flag in run
    assert "--cap-add SYS_ADMIN" not in run and "--cap-add MKNOD" not in run
    assert any(c.startswith("exec -it -w /root fake-container bash") for c in calls)
    assert calls[-1] == "rm -f fake-container"
