"""The sandbox for untrusted code (``posttrain.evals.sandbox``): hostile programs end with a clear status, the
caller (this test process) survives, nothing is written outside the program's folder and nothing is left running."""

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from posttrain.evals.sandbox import STATUSES, landlock_abi, run_python

ABI = landlock_abi()


def _layers() -> list[str]:
    return run_python("pass", timeout=5).isolation


def _running(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (the sandboxed programs carry it in their code)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_program_runs_in_a_fresh_folder_with_a_scrubbed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "secret-token-for-the-test")
    monkeypatch.chdir(tmp_path)
    out = run_python(
        "import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nopen('x.txt', 'w').write('hi')\n"
        "print(open('x.txt').read())\nprint(sys.flags.isolated)",
        timeout=10,
    )
    assert out.status == "ok" and out.returncode == 0 and out.error == "", out
    folder, env, written, isolated = out.stdout.splitlines()
    assert Path(folder) != tmp_path and not Path(folder).exists()  # its own folder, removed afterwards
    assert "HF_TOKEN" not in env and "secret-token" not in out.stdout and written == "hi" and isolated == "1"
    assert {"subprocess", "tempdir", "rlimits", "scrubbed_env", "close_fds"} <= set(out.isolation)


def test_inherited_file_descriptors_are_closed(tmp_path):
    fd = os.open(tmp_path / "open.txt", os.O_CREAT | os.O_RDWR)
    os.set_inheritable(fd, True)
    try:
        out = run_python(
            f"import os\ntry:\n    os.fstat({fd}); print('open')\nexcept OSError:\n    print('closed')", timeout=10
        )
    finally:
        os.close(fd)
    assert out.status == "ok" and out.stdout.strip() == "closed", out


def test_sleep_is_a_timeout_within_the_wall_clock_budget():
    start = time.monotonic()
    out = run_python("import time\ntime.sleep(30)", timeout=1.0)
    assert out.status == "timeout" and out.returncode is None and "timeout" in out.error, out
    assert time.monotonic() - start < 2.5


def test_a_busy_loop_hits_the_cpu_limit():
    # a wall clock far beyond the CPU limit: on a loaded machine one CPU second can take several seconds
    out = run_python("while True:\n    pass", timeout=30, cpu_seconds=1)
    assert out.status == "cpu_limit" and "CPU" in out.error, out


def test_unbounded_allocation_hits_the_memory_limit():
    # bounded at 2 GiB so that a sandbox without the limit fails this test without hurting the machine
    out = run_python(
        "chunks = []\nfor _ in range(64):\n    chunks.append(bytearray(32 << 20))\nprint('allocated')",
        timeout=10,
        memory_mb=256,
    )
    assert out.status == "memory_limit" and "MemoryError" in out.error and "allocated" not in out.stdout, out


@pytest.mark.skipif(ABI == 0 and os.geteuid() == 0, reason="needs Landlock (or a non-root caller) to confine writes")
def test_a_write_outside_its_folder_is_denied(tmp_path):
    target = tmp_path / "outside.txt"
    out = run_python(f"open({str(target)!r}, 'w').write('escaped')", timeout=10)
    assert out.status == "denied" and "Permission denied" in out.error, out
    assert not target.exists()
    out = run_python(f"import os\nos.remove({str(tmp_path)!r})", timeout=10)  # removal too
    assert out.status in ("denied", "error") and tmp_path.exists(), out


@pytest.mark.skipif("process_limit" not in _layers(), reason="root without a pids cgroup: no process limit here")
def test_a_fork_bomb_hits_the_process_limit_and_leaves_nothing_running():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    out = run_python(f"# {marker}\nimport os\nwhile True:\n    os.fork()", timeout=5, max_processes=16)
    assert out.status == "process_limit" and "Resource temporarily unavailable" in out.error, out
    time.sleep(0.2)
    assert _running(marker) == []


def test_children_are_killed_at_the_timeout():
    marker = f"sleeper-{uuid.uuid4().hex}"
    code = f"# {marker}\nimport os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        break\ntime.sleep(60)"
    start = time.monotonic()
    out = run_python(code, timeout=1.0)
    assert out.status == "timeout" and time.monotonic() - start < 3, out
    time.sleep(0.2)
    assert _running(marker) == []


@pytest.mark.skipif(ABI < 6, reason="signal scoping needs Landlock ABI 6")
def test_a_signal_to_an_outside_process_is_denied():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        out = run_python(f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)", timeout=10)
        assert out.status == "denied" and "Operation not permitted" in out.error, out
        assert victim.poll() is None
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


@pytest.mark.skipif(ABI < 4, reason="TCP restrictions need Landlock ABI 4")
def test_a_network_connection_is_denied():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        out = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", timeout=10)
        assert out.status == "denied", out
    finally:
        server.close()


def test_output_is_capped():
    out = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=10, max_output_bytes=1 << 16)
    assert out.status == "file_limit" and len(out.stdout) <= 1 << 16, (out.status, out.error)


def test_errors_are_one_line_reasons():
    out = run_python("def broken(:\n    pass", timeout=10)
    assert out.status == "error" and out.error.startswith("SyntaxError"), out
    out = run_python("raise SystemExit(3)", timeout=10)
    assert out.status == "error" and out.returncode == 3 and out.error == "exit code 3", out
    assert set(STATUSES) >= {"ok", "error", "timeout", "cpu_limit", "memory_limit", "process_limit", "denied"}
