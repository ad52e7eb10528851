"""Real processes for end-to-end tests: the stand-in gateway and `python -m service` replicas.

Each process gets a free port and a log file; readiness is polled with a deadline, never slept
for. `start_replicas` is generic (any count, any extra environment), so a load balancer can be
put in front of the replicas. Load the fixtures with `pytest_plugins = ["tests.processes"]`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.05

E2E_CLIENT_KEY = "e2e-client-key-acme"
E2E_GATEWAY_KEY = "e2e-gw-secret-0000"
E2E_LOCK_TTL_SECONDS = 3
E2E_LOCK_WAIT_SECONDS = 10
E2E_SHUTDOWN_TIMEOUT_SECONDS = 15


def accepts_connections(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """A child process listening on 127.0.0.1:port, its output in `log_path`."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, path: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Poll GET `path` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=1.0) as client:
            while True:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode} before it was ready:"
                        f"\n{self.log_tail()}"
                    )
                try:
                    if client.get(path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {timeout:g} s:\n{self.log_tail()}"
                    )
                time.sleep(POLL_SECONDS)

    def wait(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        return self.process.wait(timeout=timeout)

    def terminate(self) -> None:
        """Send SIGTERM and return at once (the process drains, then exits)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM and wait for the exit; SIGKILL if it takes longer than `timeout`."""
        self.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> int:
        """SIGKILL, as a crash would, and reap the process."""
        if self.alive():
            self.process.kill()
        return self.process.wait()


class Replica(ManagedProcess):
    """One `python -m service` process."""


class GatewayProcess(ManagedProcess):
    """`python -m tests.gateway_server PORT`; its chat-completions base URL is `base_url`."""

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def stop_all(processes: Iterable[ManagedProcess], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM every process first, then wait for each: they drain side by side."""
    running = list(processes)
    for process in running:
        process.terminate()
    for process in running:
        process.stop(timeout)


def _spawn(
    name: str, args: list[str], port: int, log_dir: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{name}.log").open("ab") as log:
        # The child keeps its own copy of the descriptor; ours closes with the `with`.
        return subprocess.Popen(
            args,
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def start_gateway(log_dir: Path, *, port: int | None = None) -> GatewayProcess:
    """Start the stand-in gateway and wait until it answers."""
    port = port or free_port()
    name = f"gateway-{port}"
    process = _spawn(
        name, [sys.executable, "-m", "tests.gateway_server", str(port)], port, log_dir, {}
    )
    gateway = GatewayProcess(name, port, process, log_dir / f"{name}.log")
    try:
        gateway.wait_ready("/_received")
    except BaseException:
        gateway.kill()
        raise
    return gateway


def replica_env(redis_url: str, gateway_url: str, port: int, **env: str) -> dict[str, str]:
    """The environment of one replica in client-key mode; `env` adds or overrides variables."""
    return {
        "REDIS_URL": redis_url,
        "GATEWAY_URL": gateway_url,
        "GATEWAY_API_KEY": E2E_GATEWAY_KEY,
        "API_KEYS": f"acme:{E2E_CLIENT_KEY}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",
        "LOCK_TTL_SECONDS": str(E2E_LOCK_TTL_SECONDS),
        "LOCK_WAIT_SECONDS": str(E2E_LOCK_WAIT_SECONDS),
        "SHUTDOWN_TIMEOUT_SECONDS": str(E2E_SHUTDOWN_TIMEOUT_SECONDS),
        "LOG_LEVEL": "warning",
        **env,
    }


def start_replicas(
    n: int,
    redis_url: str,
    gateway_url: str,
    *,
    log_dir: Path,
    ready_path: str = "/readyz",
    **env: str,
) -> list[Replica]:
    """Start `n` replicas side by side, then wait until every one is ready."""
    started: list[Replica] = []
    try:
        for _ in range(n):
            port = free_port()
            name = f"replica-{port}"
            full_env = replica_env(redis_url, gateway_url, port, **env)
            process = _spawn(name, [sys.executable, "-m", "service"], port, log_dir, full_env)
            started.append(Replica(name, port, process, log_dir / f"{name}.log", full_env))
        for replica in started:
            replica.wait_ready(ready_path)
    except BaseException:
        for replica in started:
            replica.kill()
        raise
    return started


class GatewayControl:
    """The stand-in gateway's control routes, over an async client the caller owns."""

    def __init__(self, http: httpx.AsyncClient, gateway: GatewayProcess) -> None:
        self._http = http
        self._url = gateway.url

    async def received(self) -> list[dict[str, Any]]:
        response = await self._http.get(f"{self._url}/_received")
        response.raise_for_status()
        bodies: list[dict[str, Any]] = response.json()["received"]
        return bodies

    async def summary_received(self) -> list[dict[str, Any]]:
        response = await self._http.get(f"{self._url}/_received")
        response.raise_for_status()
        bodies: list[dict[str, Any]] = response.json()["summary_received"]
        return bodies

    async def received_headers(self) -> list[dict[str, str]]:
        response = await self._http.get(f"{self._url}/_received")
        response.raise_for_status()
        headers: list[dict[str, str]] = response.json()["headers"]
        return headers

    async def configure(self, **config: Any) -> None:
        response = await self._http.post(f"{self._url}/_config", json=config)
        response.raise_for_status()

    async def release(self) -> None:
        response = await self._http.post(f"{self._url}/_release")
        response.raise_for_status()

    async def reset(self) -> None:
        response = await self._http.post(f"{self._url}/_reset")
        response.raise_for_status()


@pytest.fixture(scope="session")
def gateway_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = start_gateway(tmp_path_factory.mktemp("e2e-logs"))
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def replicas(
    redis_url: str, gateway_process: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    """Three replicas on the session's Redis, shared by a module's tests: do not stop them."""
    started = start_replicas(
        3, redis_url, gateway_process.base_url, log_dir=tmp_path_factory.mktemp("e2e-logs")
    )
    yield started
    stop_all(started)


@pytest.fixture
def spawn_replica(
    redis_url: str, gateway_process: GatewayProcess, tmp_path: Path
) -> Iterator[Callable[..., Replica]]:
    """Start one more replica for a test that kills or stops it; reaped at the test's end."""
    started: list[Replica] = []

    def spawn(**env: str) -> Replica:
        (replica,) = start_replicas(1, redis_url, gateway_process.base_url, log_dir=tmp_path, **env)
        started.append(replica)
        return replica

    yield spawn
    for replica in started:
        replica.kill()


@pytest.fixture
async def gateway_control(gateway_process: GatewayProcess) -> AsyncIterator[GatewayControl]:
    """The stand-in, reset before the test and released after it (a failed test may hold it)."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        control = GatewayControl(http, gateway_process)
        await control.reset()
        yield control
        await control.release()
        await control.reset()
