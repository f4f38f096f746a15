"""An interactive bash on a pseudo-terminal, driven command by command: the shell half shared by both backends.

The shell runs with job control on a terminal (as AgentBench's ``bash --login`` on a container tty does), so a
foreground command has its own process group that can be interrupted on a timeout while the shell and background
jobs live on. The end of a command is recognised by a marker that the shell prints from ``PROMPT_COMMAND``: a
random nonce, the command's status and the shell's pid. A command is sent as ANSI-C quoted chunks appended to a
variable, then ``eval``'d on one short line: a terminal line holds at most 4,095 bytes, and the command must not be
readable by the command before it (nothing is typed ahead).
"""

from __future__ import annotations

import os
import re
import secrets
import select
import subprocess
import termios
import time
from collections.abc import Callable

from genpi.environments.sandbox.base import ShellBase, ShellResult

CHUNK_BYTES = 800  # quoted, at most 4 characters per byte: under the 4,095-byte line limit of a terminal
SETUP_TIMEOUT_S = 30.0
INTERRUPT_GRACE_S = 1.0  # after Ctrl-C, before the foreground group is killed
HOST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}  # host tools only; nothing else of ours
SAFE_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,._+-/:=@%^")


def ansi_c_quote(data: bytes) -> str:
    """``data`` as a bash ``$'...'`` word: printable safe bytes as they are, every other byte as ``\\xHH``."""
    return "$'" + "".join(chr(b) if b in SAFE_BYTES else f"\\x{b:02x}" for b in data) + "'"


def read_capped(fd: int, deadline: float, limit: int, stop: Callable[[bytes], int | None] | None = None,
                exited: Callable[[], bool] | None = None, initial: bytes = b"") -> tuple[bytes, bool, str]:
    """Read ``fd`` until ``stop(pending)`` returns an index, EOF, ``exited()`` or ``deadline``; keep <= ``limit`` bytes.

    ``exited`` is asked whenever nothing is left to read: a shell whose background jobs hold its terminal open
    gives no EOF when it exits.
    Returns (kept bytes, truncated, how it ended: ``"stop"`` | ``"eof"`` | ``"deadline"``). Bytes past the limit are
    read and discarded, so an endless writer never blocks and never fills memory. The last 256 bytes stay pending
    so a marker split across reads is still found.
    """
    kept = bytearray()
    pending = bytearray(initial)  # bytes already read past the previous marker
    truncated = False

    def keep(data: bytes) -> None:
        nonlocal truncated
        room = limit - len(kept)
        if len(data) > room:
            truncated = True
        kept.extend(data[:max(room, 0)])

    while True:
        if stop is not None:
            at = stop(bytes(pending))
            if at is not None:
                keep(pending[:at])
                return bytes(kept), truncated, "stop"
        if len(pending) > 256:
            keep(pending[:-256])
            del pending[:-256]
        left = deadline - time.monotonic()
        if left <= 0:
            keep(pending)
            return bytes(kept), truncated, "deadline"
        ready, _, _ = select.select([fd], [], [], min(left, 0.1 if exited else 0.5))
        if not ready:
            if exited is not None and exited():
                keep(pending)
                return bytes(kept), truncated, "eof"
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            data = b""
        if not data:
            keep(pending)
            return bytes(kept), truncated, "eof"
        pending.extend(data)


def clean_text(data: bytes) -> str:
    """Terminal bytes as text: a terminal's CR LF line ends made LF, invalid UTF-8 replaced."""
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


class TerminalBash:
    """One interactive bash on a fresh pseudo-terminal.

    ``spawn(slave_fd)`` starts the process that ends in ``bash -i`` inside the machine with the terminal as its
    stdin/stdout/stderr and controlling terminal; ``kill_group(shell_pid, shell_too)`` kills, from outside the
    shell, the foreground process group of the shell whose pid (as the machine sees it) is ``shell_pid``, and with
    ``shell_too`` the shell's own group as well.
    """

    def __init__(self, spawn: Callable[[int], subprocess.Popen], kill_group: Callable[[int, bool], None],
                 output_limit: int):
        self.output_limit = output_limit
        self.kill_group = kill_group
        self.nonce = secrets.token_hex(8)
        self.marker = re.compile(rb"\x1e" + self.nonce.encode() + rb" (\d+) (\d+)\x1f")
        self.master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # lflag: the commands typed are not echoed back into the output
        attrs[1] &= ~termios.ONLCR  # oflag: LF stays LF
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        try:
            self.process = spawn(slave)
        finally:
            os.close(slave)
        self.shell_pid = 0
        self.alive = True
        self._after_marker = b""
        prompt_command = (f'__genpi_rc=$?; printf "\\036{self.nonce} %d %d\\037" "$__genpi_rc" "$$"')
        setup = (f"stty -echo -onlcr 2>/dev/null; PS1=''; PS2=''; unset HISTFILE; "
                 f"PROMPT_COMMAND='{prompt_command}'\n")
        os.write(self.master, setup.encode())
        _, _, ended, found = self._until_marker(time.monotonic() + SETUP_TIMEOUT_S)
        if found is None:
            self.close()
            raise RuntimeError(f"the sandbox's shell did not start ({ended})")
        self.shell_pid = found[1]

    def _until_marker(self, deadline: float) -> tuple[bytes, bool, str, tuple[int, int] | None]:
        found: list[tuple[int, int]] = []

        def stop(pending: bytes) -> int | None:
            match = self.marker.search(pending)
            if match is None:
                return None
            found.append((int(match.group(1)), int(match.group(2))))
            self._after_marker = pending[match.end():]
            return match.start()

        carried, self._after_marker = self._after_marker, b""
        data, truncated, ended = read_capped(self.master, deadline, self.output_limit, stop,
                                             lambda: self.process.poll() is not None, carried)
        return data, truncated, ended, (found[0] if found else None)

    def _send_line(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def run(self, command: str, timeout: float) -> ShellResult:
        """Run ``command`` in the shell; at ``timeout`` seconds interrupt it (Ctrl-C, then SIGKILL of its group)."""
        if not self.alive:
            return ShellResult("", None, False, False)
        deadline = time.monotonic() + timeout
        data = command.encode()
        chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        # What background jobs printed since the last command arrives while the command is being sent: it is
        # part of this command's output, as on a terminal.
        early = bytearray()
        for index, chunk in enumerate(chunks):
            op = "=" if index == 0 else "+="
            self._send_line(f"__genpi_cmd{op}{ansi_c_quote(chunk)}")
            printed, _, ended, found = self._until_marker(min(deadline, time.monotonic() + SETUP_TIMEOUT_S))
            early.extend(printed)
            if found is None:
                return self._broken(bytes(early[:self.output_limit]), len(early) > self.output_limit,
                                    ended == "deadline")
        self._send_line('eval "$__genpi_cmd"')
        output, truncated, ended, found = self._until_marker(deadline)
        if early:
            combined = bytes(early) + output
            output, truncated = combined[:self.output_limit], truncated or len(combined) > self.output_limit
        if found is not None:
            return ShellResult(clean_text(output), found[0], False, truncated)
        if ended == "eof":
            return self._broken(output, truncated, False)
        # Timed out: interrupt the foreground job as a user at the terminal would, then kill it.
        kept = bytearray(output)
        for attempt in range(2):
            if attempt == 0:
                os.write(self.master, b"\x03")
            else:
                try:
                    self.kill_group(self.shell_pid, False)
                except Exception:  # the machine is beyond reach: the shell is discarded below
                    pass
            more, more_truncated, ended, found = self._until_marker(time.monotonic() + INTERRUPT_GRACE_S * 2)
            truncated = truncated or more_truncated
            room = self.output_limit - len(kept)
            truncated = truncated or len(more) > room
            kept.extend(more[:max(room, 0)])
            if found is not None:
                return ShellResult(clean_text(bytes(kept)), None, True, truncated)
            if ended == "eof":
                break
        return self._broken(bytes(kept), truncated, True)

    def _broken(self, output: bytes, truncated: bool, timed_out: bool) -> ShellResult:
        """The shell ended (``exit``, ``kill -9 -1``) or stopped answering: report what it printed, discard it."""
        if self.process.poll() is None and self.shell_pid:
            try:  # it lives in its own session inside the machine: killing the host side would not reach it
                self.kill_group(self.shell_pid, True)
                self.process.wait(timeout=3)  # the host side reaps it and ends
            except Exception:
                pass
        code = None
        if not timed_out:
            try:
                code = self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
            code = code if code is not None and code >= 0 and code < 128 else None
        self.close()
        return ShellResult(clean_text(output), code, timed_out, truncated)

    def close(self) -> None:
        self.alive = False
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class TerminalMachine(ShellBase):
    """The :class:`~genpi.environments.sandbox.base.Shell` of a backend: limits, the interactive shell, scripts.

    A backend states how a command enters its machine (:meth:`_command`) and how the machine is discarded
    (:meth:`_discard`); the wall-time limits per command and per episode, the output limit, restarting a shell that
    exited, interrupting a command and running scripts are the same for every backend.
    """

    def __init__(self, settings):
        self.settings = settings
        self.started = time.monotonic()
        self.closed = False
        self.terminal: TerminalBash | None = None

    def _command(self, argv: list[str], terminal: bool) -> list[str]:
        """The host command that runs ``argv`` inside the machine (with a controlling terminal if ``terminal``)."""
        raise NotImplementedError

    def _discard(self) -> None:
        """End every process of the machine and drop its state."""
        raise NotImplementedError

    def _time_left(self, timeout: float | None) -> float:
        episode_left = self.settings.episode_timeout - (time.monotonic() - self.started)
        return min(self.settings.command_timeout if timeout is None else timeout, episode_left)

    def run(self, command: str, timeout: float | None = None) -> ShellResult:
        if self.closed:
            raise RuntimeError("run() on a closed sandbox shell")
        left = self._time_left(timeout)
        if left <= 0:
            return ShellResult("", None, True, False)
        if self.terminal is None or not self.terminal.alive:
            # A fresh shell in the same machine (the previous one exited or was killed): files, users and
            # background processes stay; the working directory and variables start over.
            self.terminal = TerminalBash(self._spawn_terminal, self._kill_foreground, self.settings.output_limit)
        return self.terminal.run(command, left)

    def _spawn_terminal(self, slave: int) -> subprocess.Popen:
        argv = self._command(["bash", "--noediting", "--noprofile", "--norc", "-i"], terminal=True)
        return subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=HOST_ENV, start_new_session=True)

    def _kill_foreground(self, shell_pid: int, shell_too: bool = False) -> None:
        # Field 8 of /proc/PID/stat is the terminal's foreground process group (field 6 after "(comm) ").
        script = (f's=$(cat /proc/{shell_pid}/stat) && s=${{s##*) }} && set -- $s && '
                  f'[ "$6" -gt 0 ] && [ "$6" != {shell_pid} ] && kill -KILL -- "-$6"')
        if shell_too:  # the shell leads its own session, so its group is its pid
            script = f"{script}; kill -KILL -- -{shell_pid}"
        self.execute(["bash", "-c", script], timeout=10)

    def execute(self, argv: list[str], timeout: float | None = None) -> ShellResult:
        if self.closed:
            raise RuntimeError("execute() on a closed sandbox shell")
        left = self._time_left(timeout)
        if left <= 0:
            return ShellResult("", None, True, False)
        # `timeout` inside the machine kills the script's whole process group at the limit; the host only waits.
        inner = ["timeout", "-s", "KILL", f"{left:.3f}"] + list(argv)
        proc = subprocess.Popen(self._command(inner, terminal=False), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=HOST_ENV, start_new_session=True)
        start = time.monotonic()
        out, truncated, ended = read_capped(proc.stdout.fileno(), start + left + 5, self.settings.output_limit)
        try:
            code = proc.wait(timeout=max(0.1, start + left + 5 - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            code = proc.wait()
        proc.stdout.close()
        timed_out = ended == "deadline" or (code == 137 and time.monotonic() - start >= left - 0.05)
        return ShellResult(clean_text(out), None if timed_out or code < 0 else code, timed_out, truncated)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.terminal is not None:
            self.terminal.close()
        self._discard()
