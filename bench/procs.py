"""Processes of a bench run: free ports, pinned children, readiness waits, the machine."""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SERVICE_CORE = "0"
LOAD_CORE = "1"  # wrk, the upstreams and Redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(core: str, argv: Sequence[str]) -> list[str]:
    """`argv` under `taskset -c core` when taskset exists and the machine has two cores."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", core, *argv]
    return list(argv)


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group: stopping it stops its children
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def exit_text(self) -> str:
        code = self.popen.poll()
        if code is None:
            return "running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def wait_http(proc: Proc, port: int, path: str, *, timeout: float, expect: int = 200) -> None:
    """Poll GET path until it answers `expect`; raise with the log's tail if it never does."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            status = conn.getresponse().status
            if status == expect:
                return
            last = f"status {status}"
        except OSError as exc:
            last = type(exc).__name__
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready after {timeout:g} s ({last}):\n{proc.tail()}")


def wait_port(proc: Proc, port: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} does not listen on {port} after {timeout:g} s")


def ensure_tools(tools: dict[str, str]) -> list[str]:
    """Install missing commands (command -> Debian package) with apt-get when root.
    Returns what is still missing."""
    missing = {cmd: pkg for cmd, pkg in tools.items() if not shutil.which(cmd)}
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = sorted(set(missing.values()))
        print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
        _quiet(["apt-get", "install", "-y", "-qq", *packages])
        if any(not shutil.which(cmd) for cmd in missing):  # stale package lists: refresh, retry
            _quiet(["apt-get", "update", "-qq"])
            _quiet(["apt-get", "install", "-y", "-qq", *packages])
    return [pkg for cmd, pkg in missing.items() if not shutil.which(cmd)]


def _quiet(argv: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(argv, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def machine() -> dict[str, str]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "taskset": "yes" if pinned("0", ["x"])[0] == "taskset" else "no (not pinned)",
    }


def busy_cores(seconds: float = 1.0) -> float:
    """Cores' worth of CPU in use by anything (before the bench starts: other people's load)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
    return busy * (os.cpu_count() or 1)


def raise_nofile() -> None:
    """Children inherit the limit: 500 connections each way need more than 1024 descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
