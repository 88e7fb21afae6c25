"""Run untrusted Python (model-written code) in a child process that cannot take the caller down.

``run_python(code)`` writes nothing outside a fresh temporary folder, and gives back a ``SandboxResult``
whose ``status`` says what happened in one word: ``ok``, ``error`` (non-zero exit; ``error`` holds the
last line of stderr), ``timeout`` (wall clock), ``cpu_limit``, ``memory_limit``, ``process_limit``,
``file_limit`` (a file or the output grew past ``max_output_bytes``), ``denied`` (a write outside the
folder, a network connection, a signal to an outside process: refused by the kernel) or ``killed``
(another signal). Layers, each applied by the kernel to the child and everything it starts:

- a **subprocess** of this interpreter (``python -I``: no user site, no ``PYTHON*`` variables, the
  working folder not on ``sys.path``) in its own session, so a timeout kills its whole process group;
- a **temporary working directory**, also its ``HOME`` and ``TMPDIR``, removed afterwards;
- **rlimits** set in ``preexec_fn``: CPU seconds, address space, open files, file size (which also caps
  stdout and stderr: they go to files, never to pipes the caller could block on), no core dumps, and a
  process count;
- a **scrubbed environment** (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``, one thread for OpenMP/BLAS;
  nothing of the caller's: tokens, cache paths, ``CUDA_*``) and **no inherited file descriptors**
  (``close_fds``, stdin from ``/dev/null``);
- **Landlock** (Linux >= 5.13; kernel docs, Documentation/userspace-api/landlock.rst) where the kernel has
  it: file writes, creation and removal only beneath the working folder (and ``/dev/null``); with ABI >= 4
  no TCP connect or bind; with ABI >= 6 no signals to, and no abstract Unix sockets of, processes outside
  the sandbox. Reads stay allowed (the interpreter and its packages must load);
- a **process limit**: in a ``pids`` cgroup of its own where one can be made (root, or a delegated cgroup), which
  also kills every process the code started, ``setsid`` or not; otherwise RLIMIT_NPROC, for a non-root user
  counted over all the user's processes (so the limit is what runs now plus ``max_processes``). Run as root
  with an interpreter that ``nobody`` can reach, the child also **drops to ``nobody``** (RLIMIT_NPROC never
  applies to root).

``isolation`` in the result lists the layers that were applied (the tests check which ones this machine has).
Not covered: without a pids cgroup, a process that calls ``setsid`` escapes the process-group kill at the
timeout (it still dies at its CPU limit); reads of world-readable files are allowed; root without a pids cgroup
has no process limit at all (``isolation`` then lacks ``process_limit``).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("ok", "error", "timeout", "cpu_limit", "memory_limit", "process_limit", "file_limit", "denied", "killed")


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    stdout: str
    stderr: str
    returncode: int | None  # None: killed at the wall-clock timeout
    seconds: float  # wall clock, start to exit
    error: str = ""  # one line: why it failed ("" when ok)
    isolation: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------- Landlock
# The Landlock system calls have no wrapper in Python's standard library nor in a maintained PyPI package that
# this project could pin (the kernel interface is three syscalls and two structs), so they are called here
# through ctypes. Numbers are the same on every Linux architecture (asm-generic table).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
# filesystem access rights (ABI 1: bits 0-12; ABI 2 adds REFER (13); ABI 3 TRUNCATE (14); ABI 5 IOCTL_DEV (15))
_FS_WRITE_FILE = 1 << 1
_FS_WRITE_RIGHTS_ABI1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where it has none (not Linux, disabled, or blocked by seccomp)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def _landlock_restrict(abi: int, writable: list[str], writable_files: list[str]) -> None:
    """Restrict this process (and its future children) to writing beneath ``writable`` only. Runs in the child
    between fork and exec: it raises OSError on failure, which Popen reports to the caller."""
    libc = ctypes.CDLL(None, use_errno=True)
    fs = _FS_WRITE_RIGHTS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(
        fs,
        _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0,
    )
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)  # the struct grew with the ABI
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for paths, rights in ((writable, fs), (writable_files, _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0))):
            for path in paths:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    rule = _PathBeneathAttr(rights, fd)
                    if (
                        libc.syscall(
                            _SYS_ADD_RULE,
                            ctypes.c_int(ruleset),
                            ctypes.c_int(_RULE_PATH_BENEATH),
                            ctypes.byref(rule),
                            ctypes.c_uint32(0),
                        )
                        != 0
                    ):
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
                finally:
                    os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


# ----------------------------------------------------------------------------------------------- running


def _user_process_count(uid: int) -> int:
    """Processes (threads count too, for RLIMIT_NPROC) now owned by ``uid``."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


class _PidsCgroup:
    """A fresh ``pids`` cgroup (v1 or v2) beside this process's own, with ``pids.max``; ``None`` from ``make`` where
    none can be created (no controller, no permission). ``kill_all`` ends every process in it."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def make(cls, max_pids: int) -> "_PidsCgroup | None":
        try:
            mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
            own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        except OSError:
            return None
        base = None
        v1 = [m[1] for m in mounts if len(m) > 3 and m[2] == "cgroup" and "pids" in m[3].split(",")]
        mine_v1 = [p for _, ctrl, p in own if "pids" in ctrl.split(",")]
        if v1 and mine_v1:
            base = Path(v1[0]) / mine_v1[0].lstrip("/")
        else:
            v2 = [m[1] for m in mounts if len(m) > 2 and m[2] == "cgroup2"]
            mine_v2 = [p for h, ctrl, p in own if h == "0" and ctrl == ""]
            if v2 and mine_v2:
                candidate = Path(v2[0]) / mine_v2[0].lstrip("/")
                try:
                    if "pids" in (candidate / "cgroup.subtree_control").read_text().split():
                        base = candidate
                except OSError:
                    pass
        if base is None:
            return None
        try:
            path = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-", dir=base))
            (path / "pids.max").write_text(str(max_pids))
        except OSError:
            return None
        return cls(path)

    def enter(self) -> None:  # in the child, before exec
        with open(self.path / "cgroup.procs", "w") as f:
            f.write("0")

    def kill_all(self) -> None:
        for _ in range(200):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        try:
            self.path.rmdir()
        except OSError:
            pass


def _reachable_by_other(path: str) -> bool:
    """Whether a user with no special rights can execute ``path`` (every folder above it searchable by others)."""
    real = Path(os.path.realpath(path))
    try:
        return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])
    except OSError:
        return False


def _classify(returncode: int, stderr: str, timed_out: bool, cpu_seconds: float, cpu_used: float) -> tuple[str, str]:
    """(status, one-line reason) from how the child ended."""
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if timed_out:
        return "timeout", ""
    if returncode == 0:
        return "ok", ""
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and cpu_used >= cpu_seconds - 0.05:
        return "cpu_limit", f"CPU time limit ({cpu_seconds:g} s) reached"
    if returncode == -signal.SIGXFSZ:
        return "file_limit", "a file or the output grew past the size limit"
    if returncode < 0:
        return "killed", f"killed by signal {signal.Signals(-returncode).name}"
    text = stderr[-4000:]
    if "MemoryError" in text or "Cannot allocate memory" in text or "std::bad_alloc" in text:
        return "memory_limit", last or "out of memory"
    if "BlockingIOError" in text and "Resource temporarily unavailable" in text or "can't start new thread" in text:
        return "process_limit", last
    if "PermissionError" in text or "Permission denied" in text or "Operation not permitted" in text:
        return "denied", last
    if "File too large" in text:
        return "file_limit", last
    return "error", last or f"exit code {returncode}"


def run_python(
    code: str,
    *,
    timeout: float = 3.0,
    cpu_seconds: float | None = None,
    memory_mb: int = 2048,
    max_processes: int = 64,
    max_output_bytes: int = 1 << 20,
    max_open_files: int = 256,
    python: str | None = None,
    landlock: bool = True,
    drop_root: bool = True,
) -> SandboxResult:
    """Run ``code`` as ``python -I -c code`` under the limits above; never raises for anything the code does.

    ``timeout``: wall-clock seconds (the process group is killed after it); ``cpu_seconds``: the CPU limit
    (default: ``timeout`` + 1, so a busy loop ends at the wall clock first); ``memory_mb``: address-space limit
    per process; ``max_processes``: how many more processes the code may run at once (PuLP starts CBC as one);
    ``max_output_bytes``: the limit on any file it writes, stdout and stderr included."""
    python = python or sys.executable
    cpu_seconds = float(cpu_seconds if cpu_seconds is not None else timeout + 1)
    abi = landlock_abi() if landlock else 0
    root = os.geteuid() == 0
    drop = drop_root and root and _reachable_by_other(python)
    uid = 65534 if drop else os.geteuid()  # nobody
    # non-root: RLIMIT_NPROC counts every process of the user, so the limit is what runs now plus the allowance
    nproc = max_processes if drop else _user_process_count(uid) + max_processes
    isolation = ["subprocess", "tempdir", "rlimits", "scrubbed_env", "close_fds"]
    if abi:
        isolation.append(f"landlock_abi{abi}")
    if drop:
        isolation.append("nobody")
    cgroup = _PidsCgroup.make(max_processes + 1) if max_processes > 0 else None
    if cgroup is not None or not root or drop:
        isolation.append("process_limit")
    if cgroup is not None:
        isolation.append("pids_cgroup")
    work = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-"))
    logs = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-out-"))  # stdout/stderr files: outside the child's reach
    try:
        if drop:
            os.chown(work, uid, 65534)
        os.chmod(work, 0o700)
        env = {
            "PATH": f"{Path(python).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "MPLBACKEND": "Agg",
        }
        memory = int(memory_mb) << 20

        def limit() -> None:  # in the child, after the uid drop, before exec
            resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_seconds + 0.999), int(cpu_seconds + 0.999) + 1))
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_output_bytes, max_output_bytes))
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            if cgroup is not None:
                cgroup.enter()
            if abi:
                _landlock_restrict(abi, [str(work)], [os.devnull])

        start = time.monotonic()
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-c", code],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    close_fds=True,
                    pass_fds=(),
                    start_new_session=True,
                    preexec_fn=limit,
                    user=uid if drop else None,
                    group=65534 if drop else None,
                    extra_groups=[] if drop else None,
                )
            except (OSError, subprocess.SubprocessError) as exc:  # the sandbox itself could not start
                return SandboxResult(
                    "error", "", "", None, time.monotonic() - start, f"sandbox failed to start: {exc}", isolation
                )
            timed_out = False
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the code's children too, finished or not
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if cgroup is not None:
                    cgroup.kill_all()
                proc.wait()
            seconds = time.monotonic() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

        def read(name: str) -> str:
            with open(logs / name, "rb") as f:
                return f.read(max_output_bytes).decode("utf-8", errors="replace")

        stdout, stderr = read("stdout"), read("stderr")
        status, reason = _classify(proc.returncode, stderr, timed_out, cpu_seconds, cpu_used)
        if status == "timeout":
            reason = f"wall-clock timeout ({timeout:g} s)"
        return SandboxResult(status, stdout, stderr, None if timed_out else proc.returncode, seconds, reason, isolation)
    finally:
        if cgroup is not None:
            cgroup.kill_all()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


__all__ = ["STATUSES", "SandboxResult", "landlock_abi", "run_python"]
