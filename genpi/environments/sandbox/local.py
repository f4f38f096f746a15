"""The ``local`` backend: one episode's machine out of Linux namespaces, overlays and a cgroup; no Docker needed.

The arrangement, and why (the README's sandbox section says the same for users):

- **A user namespace that maps every uid and gid to itself**, with new mount, pid, network, ipc and uts namespaces.
  Root in the sandbox has its capabilities only inside these namespaces: the kernel refuses it everything that is
  checked against the host (loading modules, setting the clock, raw devices, ``open_by_handle_at``, mounting over
  the host, joining other cgroups). The identity map is what lets the overlays copy up files owned by any user or
  group (``useradd`` rewrites ``/etc/gshadow``, owned by group ``shadow``); a user namespace that maps only root
  cannot (measured here: ``useradd: cannot open /etc/gshadow``). Its cost: for plain file permissions the sandbox's
  root is uid 0, so every host path it can reach is mounted read-only or replaced, as below.
- **A root file system built for the sandbox** on one size-bounded tmpfs: ``/usr /etc /var /opt /srv`` are
  copy-on-write overlays (the host's directory as the read-only lower layer, writes in the tmpfs); ``/root``,
  ``/home``, ``/tmp``, ``/run``, ``/mnt``, ``/media`` start empty (the host's are masked, not copied: ``/root`` gets
  only ``/etc/skel``); nothing else of the host (``/work``, ``/boot``, other mounts) exists inside. The old root is
  detached after ``pivot_root``, so no path leads back to the host.
- **Secrets masked**: ``/etc/shadow`` and ``/etc/gshadow`` are replaced by copies generated from ``/etc/passwd`` and
  ``/etc/group`` with every password locked (``*``), so ``useradd`` still works on them; every other entry of the
  overlaid directories that the host keeps from other users (not world-readable: private keys, databases, logs)
  is hidden by a whiteout. ``/proc``'s host-wide knobs (``sys``, ``sysrq-trigger``, ``kcore``...) are read-only or
  masked, ``/sys`` is read-only, ``/dev`` holds only ``null zero full random urandom tty``, a private ``pts`` and
  ``shm``.
- **A clean environment** (``PATH HOME USER LOGNAME SHELL TERM LANG HOSTNAME`` only), **capabilities dropped** to
  what a container's root keeps minus ``mknod`` and ``net_raw`` (the bounding set, so no exec regains them), and
  ``no_new_privs``.
- **Limits**: a cgroup per episode (``pids.max``; memory where the memory controller is writable), the tmpfs size
  for all writes, wall time per command and per episode, output kept per command.
- **No network**: the network namespace has only a loopback interface.
- **Nested user namespaces** are forbidden (``user.max_user_namespaces=0`` inside) where the kernel lets the
  set-up write that limit; with several identity-mapped sandboxes alive it sometimes refuses (EACCES), and that
  episode then allows them, which gives the agent what any unprivileged host user has (mounts stay locked).

**The unprivileged arrangement** (genpi not running as root, e.g. a cluster user; chosen automatically): the user
namespace maps only the caller's uid, to root; no cgroup unless one is delegated, so ``RLIMIT_NPROC`` (the user's
running processes plus ``pids_max``) and ``RLIMIT_AS`` bound processes and memory, which binds because the
sandbox's root is not host root. Overlays cannot give copied-up files to owners that are not mapped, so ``/etc``
is a copy (``useradd`` works), and every host directory gets an empty twin in its upper layer, so new files can be
created anywhere (``/usr/local/bin/calc``); existing files of ``/usr /var /opt`` stay read-only, and changing a
file's owner to another user (``chown``, ``su``) fails. AgentBench's dev split passes as in the root arrangement
(``experiments/sandbox/results``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from genpi.environments.sandbox.cgroup import EpisodeCgroup
from genpi.environments.sandbox.terminal import TerminalMachine, clean_text, read_capped
from genpi.utils.errors import GenpiError

OVERLAID = ("usr", "etc", "var", "opt", "srv")  # copy-on-write views of the host's directories
FRESH = ("root", "home", "tmp", "run", "mnt", "media")  # start empty: the host's are masked
MASK_SCAN = ("etc", "var", "opt", "srv")  # scanned for entries other users cannot read (/usr holds none by convention)
GENERATED = {"etc/shadow", "etc/shadow-", "etc/gshadow", "etc/gshadow-"}
PROC_MASKED = ("sysrq-trigger", "kcore", "keys", "timer_list", "sched_debug", "kmsg", "kpagecount", "kpageflags",
               "kpagecgroup", "config.gz", "acpi", "scsi")
PROC_READ_ONLY = ("sys", "irq", "bus", "fs")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
KEPT_CAPS = ("chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap", "net_bind_service",
             "sys_chroot", "setfcap", "audit_write")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME = "sandbox"
TOOLS = ("unshare", "nsenter", "setpriv", "setsid", "pivot_root", "mount", "umount", "env", "timeout", "bash")


def clean_env(workdir: str) -> list[str]:
    """``env -i`` arguments: the sandbox's whole environment (nothing of the host's, secrets included)."""
    return ["env", "-i", "-C", workdir, f"PATH={PATH}", "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/bash",
            "TERM=dumb", "LANG=C.UTF-8", f"HOSTNAME={HOSTNAME}"]


def drop_privileges() -> list[str]:
    return ["setpriv", "--bounding-set", "-all," + ",".join("+" + c for c in KEPT_CAPS), "--inh-caps", "-all",
            "--no-new-privs", "--"]


@lru_cache(maxsize=1)
def hidden_entries() -> tuple[str, ...]:
    """Paths (relative to ``/``) under the overlaid directories that other users cannot read: hidden inside."""
    hidden = []
    for top in MASK_SCAN:
        for dirpath, dirnames, filenames in os.walk(f"/{top}", followlinks=False):
            for name in list(dirnames) + filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                rel = path.lstrip("/")
                if rel in GENERATED or (st.st_mode & 0o170000) == 0o120000:  # symlinks carry no content
                    continue
                if not st.st_mode & 0o004:
                    hidden.append(rel)
                    if name in dirnames:
                        dirnames.remove(name)  # hidden as a whole
    return tuple(sorted(hidden))


@lru_cache(maxsize=1)
def readable_directories() -> bytes:
    """Every directory the caller can read under the overlaid trees but /etc, as NUL-separated paths of the
    upper layers (``usr/upper/local/bin``): what the unprivileged arrangement pre-creates, once per episode."""
    paths = []
    for top in OVERLAID:
        if top == "etc":
            continue
        for dirpath, dirnames, _ in os.walk(f"/{top}"):
            dirnames[:] = [d for d in dirnames if os.access(os.path.join(dirpath, d), os.R_OK | os.X_OK)
                           and not os.path.islink(os.path.join(dirpath, d))]
            for name in dirnames:
                rel = os.path.relpath(os.path.join(dirpath, name), f"/{top}")
                paths.append(f"{top}/upper/{rel}")
    return b"\0".join(p.encode(errors="surrogateescape") for p in paths)


def own_process_count() -> int:
    """How many processes the current user runs on the host (what RLIMIT_NPROC counts)."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def locked_accounts(passwd: str, group: str) -> tuple[str, str]:
    """``/etc/shadow`` and ``/etc/gshadow`` for the accounts of ``passwd`` and ``group``, every password locked.

    Generated from the world-readable files, so the host's hashes are never read.
    """
    shadow = "".join(f"{line.split(':')[0]}:*:19000:0:99999:7:::\n" for line in passwd.splitlines()
                     if line and not line.startswith("#"))
    gshadow = ""
    for line in group.splitlines():
        if line and not line.startswith("#"):
            fields = line.split(":")
            members = fields[3] if len(fields) > 3 else ""
            gshadow += f"{fields[0]}:*::{members}\n"
    return shadow, gshadow


def setup_script(tmpfs_mb: int, workdir: str, privileged: bool = True) -> str:
    """The bash program that builds the sandbox's root inside the new namespaces, then becomes its init (pid 1).

    ``privileged=False`` (the unprivileged arrangement): only the caller's own uid is mapped (to root), so the
    overlays cannot copy up files owned by anyone else; ``/etc`` is then a copy (owned by the sandbox's root, so
    ``useradd`` works) instead of an overlay, and ownership changes that need unmapped ids are skipped.
    """
    shadow, gshadow = locked_accounts(Path("/etc/passwd").read_text(), Path("/etc/group").read_text())
    q = shlex.quote
    lines = [
        "set -eu",
        "read -r _",  # wait until the host has written the user namespace's id maps
        # One tmpfs holds every write of the episode (its size bounds them); mounted over /tmp in this mount
        # namespace only, so the host's /tmp is neither used nor touched.
        f"mount -t tmpfs -o size={tmpfs_mb}m,mode=755 genpi-sandbox /tmp",
        "S=/tmp; R=$S/root; L=$S/layers",
        "mkdir -p $R $L",
        "mount --bind $R $R",
    ]
    overlaid = OVERLAID if privileged else tuple(t for t in OVERLAID if t != "etc")
    # Few processes: each costs milliseconds, and a busy machine multiplies that by the number of episodes.
    hidden = hidden_entries()
    whiteouts = [rel for rel in hidden if privileged or not rel.startswith("etc/")]
    parents = set()  # directories (relative to /) that the whiteouts need in the upper layers, ancestors too
    for rel in whiteouts:
        parent = os.path.dirname(rel)
        while "/" in parent:
            parents.add(parent)
            parent = os.path.dirname(parent)
    parents = sorted(parents)
    made = [f"$L/{top}/upper" for top in OVERLAID] + [f"$L/{top}/work" for top in OVERLAID]
    made += [f"$R/{top}" for top in OVERLAID + FRESH + ("proc", "dev", "sys")]
    made += [f"$L/{q(rel.partition('/')[0])}/upper/{q(rel.partition('/')[2])}" for rel in parents]
    lines.append("mkdir -p " + " ".join(made))
    # Directories made in the upper layers take the mode (and, where ids are mapped, the owner) of the host's.
    attrs: dict[tuple[int, int, int], list[str]] = {}
    for rel in [top for top in OVERLAID] + parents:
        top, _, rest = rel.partition("/")
        try:
            st = os.stat(f"/{rel}")
        except OSError:
            continue
        attrs.setdefault((st.st_mode & 0o7777, st.st_uid, st.st_gid), []).append(
            f"$L/{top}/upper" + (f"/{q(rest)}" if rest else ""))
    for (mode, uid, gid), paths in attrs.items():
        lines.append(f"chmod {mode:o} " + " ".join(paths))
        if privileged:
            lines.append(f"chown {uid}:{gid} " + " ".join(paths))
    if not privileged:
        # The copy lands in the upper layer's place (no overlay is mounted for /etc); unreadable entries stay out.
        lines.append("cp -R --no-dereference --preserve=mode,timestamps,links /etc/. $L/etc/upper/ 2>/dev/null || true")
        lines.append("mount --bind $L/etc/upper $R/etc")
        hidden_etc = [q(rel.partition("/")[2]) for rel in hidden if rel.startswith("etc/")]
        if hidden_etc:
            lines.append("(cd $L/etc/upper && rm -rf " + " ".join(hidden_etc) + ")")
    if whiteouts:  # overlay whiteouts: the entries do not exist inside
        lines.append("for w in " + " ".join(q(f"{rel.partition('/')[0]}/upper/{rel.partition('/')[2]}")
                                            for rel in whiteouts) + "; do mknod $L/$w c 0 0; done")
    shadow_files = []
    for name, text in (("shadow", shadow), ("gshadow", gshadow)):
        for suffix in ("", "-"):
            lines.append(f"printf %s {q(text)} > $L/etc/upper/{name}{suffix}")
            shadow_files.append(f"$L/etc/upper/{name}{suffix}")
    lines.append(f"chmod 640 {' '.join(shadow_files)}; chown 0:shadow {' '.join(shadow_files)} 2>/dev/null || true")
    if not privileged:
        # Copy-up cannot give files to unmapped owners, so existing files of the host stay read-only; but a
        # directory present in the upper layer lends the merged directory its owner (the sandbox's root), so new
        # files can be created anywhere (a script into /usr/local/bin, a log under /var/log).
        # The host sends their list (computed once per sandbox) on stdin after the go-ahead: its size, a newline,
        # the list (head -c reads no further, so stdin stays open for pid 1).
        lines.append("read -r size; head -c $size | (cd $L && xargs -0 mkdir -p 2>/dev/null) || true")
    for top in overlaid:
        lines.append(f"mount -t overlay overlay -o lowerdir=/{top},upperdir=$L/{top}/upper,workdir=$L/{top}/work,"
                     f"userxattr $R/{top}")
    lines += ["cp -a /etc/skel/. $R/root/ 2>/dev/null || true", "chmod 1777 $R/tmp; chmod 700 $R/root"]
    for entry in sorted(os.listdir("/")):
        if os.path.islink(f"/{entry}") and entry not in OVERLAID + FRESH:
            lines.append(f"ln -s {q(os.readlink('/' + entry))} $R/{q(entry)}")
    lines += [
        "mount -t proc -o nosuid,nodev,noexec proc $R/proc",
        # No user namespaces inside: a nested one would give the agent a full set of capabilities there (over
        # locked mounts only). Best effort: with several identity-mapped sandboxes alive the kernel can resolve this
        # per-namespace sysctl against a sibling namespace and refuse the write (EACCES).
        "echo 0 2>/dev/null > $R/proc/sys/user/max_user_namespaces || true",
        f"for f in {' '.join(PROC_MASKED)}; do if [ -d $R/proc/$f ]; then mount -t tmpfs -o ro,size=4k genpi-mask "
        "$R/proc/$f; elif [ -e $R/proc/$f ]; then mount --bind /dev/null $R/proc/$f; fi; done",
        f"for d in {' '.join(PROC_READ_ONLY)}; do if [ -d $R/proc/$d ]; then mount --bind $R/proc/$d $R/proc/$d; "
        "mount -o remount,bind,ro $R/proc/$d; fi; done",
        "mount -t tmpfs -o size=1m,mode=755,nosuid,noexec genpi-dev $R/dev",
        "touch " + " ".join(f"$R/dev/{n}" for n in DEVICES),
        f"for n in {' '.join(DEVICES)}; do mount --bind /dev/$n $R/dev/$n; done",
        "ln -s /proc/self/fd $R/dev/fd; ln -s /proc/self/fd/0 $R/dev/stdin; ln -s /proc/self/fd/1 $R/dev/stdout; "
        "ln -s /proc/self/fd/2 $R/dev/stderr",
        "mkdir -p $R/dev/pts $R/dev/shm",
        "if mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 genpi-pts $R/dev/pts 2>/dev/null; then "
        "ln -s pts/ptmx $R/dev/ptmx; fi",
        "mount -t tmpfs -o size=64m,mode=1777,nosuid,nodev genpi-shm $R/dev/shm",
        "mount -t sysfs -o ro,nosuid,nodev,noexec sysfs $R/sys 2>/dev/null || true",
        f"hostname {HOSTNAME}",
        "ip link set lo up 2>/dev/null || true",
        "cd $R; mkdir .genpi-old-root; pivot_root . .genpi-old-root; cd /",
        "umount -l /.genpi-old-root; rmdir /.genpi-old-root",
        "echo genpi-sandbox-ready",
        # pid 1 reaps orphans (bash reaps any child on SIGCHLD) and keeps the machine alive while the host holds
        # its stdin open: if the host process dies, stdin ends, pid 1 exits and the kernel kills the whole machine.
        "exec " + " ".join(q(a) for a in drop_privileges() + clean_env(workdir)) + " bash --noprofile --norc -c "
        + q('exec >/dev/null 2>&1; trap "" HUP INT TERM; while read -r _; do :; done'),
    ]
    return "\n".join(lines) + "\n"


class LocalShell(TerminalMachine):
    """One episode's machine (its init is ``self.init_pid`` on the host) and its interactive shell."""

    def __init__(self, settings, privileged: bool = True):
        super().__init__(settings)
        self.privileged = privileged
        self.rlimits: list[str] = []
        try:
            self.cgroup: EpisodeCgroup | None = EpisodeCgroup(settings.pids_max, settings.memory_mb * 2**20)
        except GenpiError:
            if privileged:
                raise
            # Unprivileged without a delegated cgroup: rlimits bind, since the sandbox's root is not host root
            # (no CAP_SYS_RESOURCE over the host). The process count is the user's, host-wide: allow the
            # processes the user runs already plus pids_max.
            self.cgroup = None
            self.rlimits = ["prlimit", f"--nproc={own_process_count() + settings.pids_max}",
                            f"--as={settings.memory_mb * 2**20}", "--"]
        try:
            self._start_machine()
        except BaseException:
            self.close()
            raise

    # -- the machine ---------------------------------------------------------------------------------------------
    def _in_cgroup(self, argv: list[str]) -> list[str]:
        if self.cgroup is None:
            return self.rlimits + argv
        joins = "; ".join(f"echo $$ > {shlex.quote(str(f))}" for f in self.cgroup.procs_files)
        return ["sh", "-c", f'{joins} && exec "$@"', "genpi-sandbox"] + argv

    def _start_machine(self) -> None:
        script = setup_script(self.settings.tmpfs_mb, self.settings.workdir, self.privileged)
        argv = ["unshare", "--user"] + ([] if self.privileged else ["--map-root-user"]) + ["--mount", "--pid", "--net", "--ipc", "--uts", "--fork",
                "--propagation", "private", "--", "bash", "-c", script]
        self.holder = subprocess.Popen(self._in_cgroup(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, env={"PATH": PATH}, start_new_session=True)
        deadline = time.monotonic() + 30
        # The sh wrapper execs unshare, which has made the user namespace once the id maps exist as files.
        while True:
            try:
                own = os.readlink(f"/proc/{self.holder.pid}/ns/user")
                if own != os.readlink("/proc/self/ns/user"):
                    break
            except OSError:
                pass
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise GenpiError(f"the local sandbox could not start: {self._holder_output()}")
            time.sleep(0.005)
        if self.privileged:  # every id maps to itself (unshare maps only the caller's own id, to root)
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{self.holder.pid}/{name}", "w") as fh:
                    fh.write("0 0 4294967295\n")
        self.holder.stdin.write(b"go\n")
        if not self.privileged:
            listing = readable_directories()
            self.holder.stdin.write(b"%d\n" % len(listing) + listing)
        self.holder.stdin.flush()  # stdin stays open: pid 1 lives while it does
        out, _, ended = read_capped(self.holder.stdout.fileno(), deadline, 65536,
                                    lambda b: b.find(b"genpi-sandbox-ready") if b"genpi-sandbox-ready" in b else None)
        if ended != "stop":
            last = clean_text(out).strip().splitlines()
            raise GenpiError(f"the local sandbox could not build its root: {last[-1] if last else 'no output'}")
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()
        self.init_pid = int(children[0])

    def _holder_output(self) -> str:
        try:
            out = self.holder.stdout.read1(65536) if self.holder.poll() is not None else b""
        except Exception:
            out = b""
        return clean_text(out).strip() or f"exit status {self.holder.returncode}"

    def _enter(self, argv: list[str], cwd: str | None = None) -> list[str]:
        """``argv`` run inside the machine: its namespaces and root, no capabilities beyond need, clean env."""
        # Unprivileged, setgroups is denied in the namespace: keep the caller's ids (they map to root inside).
        keep_ids = [] if self.privileged else ["--preserve-credentials"]
        return self._in_cgroup(["nsenter", "-t", str(self.init_pid), "-U", "-m", "-p", "-n", "-i", "-u", "-r", "-w"]
                               + keep_ids + ["--"] + drop_privileges() + clean_env(cwd or self.settings.workdir) + argv)

    def _command(self, argv: list[str], terminal: bool) -> list[str]:
        # setsid -c: a new session whose controlling terminal is the pty on stdin, for bash's job control.
        return self._enter((["setsid", "-c"] if terminal else []) + argv)

    def _discard(self) -> None:
        holder = getattr(self, "holder", None)
        init_pid = getattr(self, "init_pid", None)
        if init_pid is not None:
            try:
                os.kill(init_pid, signal.SIGKILL)  # the kernel then kills every process of the pid namespace
            except ProcessLookupError:
                pass
        if self.cgroup is not None:
            self.cgroup.kill_all()
        if holder is not None:
            try:
                holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (holder.stdin, holder.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
        if self.cgroup is not None:
            self.cgroup.remove()


class LocalSandbox:
    """Opens :class:`LocalShell` machines. ``settings``: :class:`genpi.schema.EnvSandbox`."""

    name = "local"

    def __init__(self, settings, privileged: bool | None = None):
        """``privileged``: None picks by the effective uid (root: the root arrangement); False forces the
        unprivileged arrangement (as root, its code path maps only root)."""
        self.settings = settings
        missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
        if missing:
            raise GenpiError(f"env.backend=local needs {', '.join(missing)} (util-linux, coreutils, bash) on PATH: "
                             "install them, or use env.backend=docker")
        self.privileged = os.geteuid() == 0 if privileged is None else privileged and os.geteuid() == 0
        if not self.privileged:
            probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--pid", "--net", "--fork",
                                    "true"], capture_output=True, text=True, env={"PATH": PATH})
            if probe.returncode != 0:
                raise GenpiError(
                    "env.backend=local as a user without root needs unprivileged user namespaces, which this machine "
                    f"refuses ({(probe.stderr.strip().splitlines() or ['unshare failed'])[-1]}): ask the admins for "
                    "user.max_user_namespaces > 0, or use env.backend=docker")
        self.arrangement = "root" if self.privileged else "unprivileged"
        hidden_entries()  # scan once, before the first episode
        if not self.privileged:
            readable_directories()

    def open(self) -> LocalShell:
        return LocalShell(self.settings, self.privileged)
