"""Real Redis topologies for tests: a 3-primary Redis Cluster and a Sentinel watching one primary.

Each is a set of redis-server child processes in a temporary directory on free ports, started and
awaited by polling (never by sleeping a fixed time), and stopped by `stop()`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

CLUSTER_SLOTS = 16384
SENTINEL_MASTER = "mymaster"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_binary() -> str:
    """Redis 7 from PATH: CLUSTER ADDSLOTSRANGE and `cluster-port` need 7.0."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server (7.0 or later) is not on PATH")
    return found


def wait_for(condition: Callable[[], bool], what: str, timeout_seconds: float = 20.0) -> None:
    """Poll `condition` until it holds; errors while polling count as "not yet"."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Server:
    """One redis-server child process on 127.0.0.1:port."""

    def __init__(self, directory: Path, port: int, args: list[str], *, sentinel: bool = False):
        self.directory = directory
        self.port = port
        self.sentinel = sentinel
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "redis.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {directory}",
            f"logfile {directory / 'redis.log'}",
            "daemonize no",
            *args,
        ]
        if not sentinel:
            lines += ['save ""', "appendonly no"]
        config.write_text("\n".join(lines) + "\n")
        command = [server_binary(), str(config)]
        if sentinel:
            command.append("--sentinel")
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True
        )

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
            with self.client() as conn:
                return bool(conn.ping())

        wait_for(answers, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class LocalCluster:
    """Three primaries, no replicas, slots split evenly: `redis+cluster://` seeds all three."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.directory = directory
        self.size = size
        self.nodes: list[_Server] = []
        self.bus_ports: list[int] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> str:
        try:
            for index in range(self.size):
                self.bus_ports.append(free_port())
                self.nodes.append(
                    _Server(
                        self.directory / f"node{index}",
                        free_port(),
                        [
                            "cluster-enabled yes",
                            f"cluster-config-file {self.directory / f'nodes-{index}.conf'}",
                            f"cluster-port {self.bus_ports[index]}",
                            "cluster-node-timeout 5000",
                        ],
                    )
                )
            for node in self.nodes:
                node.wait_ready()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _form(self) -> None:
        bounds = [CLUSTER_SLOTS * i // self.size for i in range(self.size + 1)]
        first = self.nodes[0]
        for index, node in enumerate(self.nodes):
            with node.client() as conn:
                conn.execute_command(
                    "CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1
                )
                if node is not first:
                    conn.execute_command(
                        "CLUSTER", "MEET", "127.0.0.1", first.port, self.bus_ports[0]
                    )

        def formed() -> bool:
            for node in self.nodes:
                with node.client() as conn:
                    info = conn.execute_command("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else info.decode()
                    if "cluster_state:ok" not in text:
                        return False
                    if f"cluster_known_nodes:{self.size}" not in text:
                        return False
            return True

        wait_for(formed, "cluster_state:ok on every node")

    def primaries(self) -> list[redis.Redis]:
        return [node.client() for node in self.nodes]

    def flushall(self) -> None:
        for node in self.nodes:
            with node.client() as conn:
                conn.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class LocalSentinel:
    """One primary and one Sentinel monitoring it with quorum 1."""

    def __init__(self, directory: Path, master_name: str = SENTINEL_MASTER) -> None:
        self.directory = directory
        self.master_name = master_name
        self.master: _Server | None = None
        self.sentinel: _Server | None = None

    @property
    def url(self) -> str:
        assert self.sentinel is not None
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.master_name}"

    def start(self) -> str:
        try:
            self.master = _Server(self.directory / "master", free_port(), [])
            self.master.wait_ready()
            self.sentinel = _Server(
                self.directory / "sentinel",
                free_port(),
                [
                    f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1",
                    f"sentinel down-after-milliseconds {self.master_name} 5000",
                ],
                sentinel=True,
            )
            self.sentinel.wait_ready()
            wait_for(self._master_seen, f"sentinel to see {self.master_name} up")
        except BaseException:
            self.stop()
            raise
        return self.url

    def _master_seen(self) -> bool:
        assert self.sentinel is not None
        assert self.master is not None
        with self.sentinel.client() as conn:
            state = conn.execute_command("SENTINEL", "MASTER", self.master_name)
            fields = (
                state
                if isinstance(state, dict)
                else dict(zip(state[::2], state[1::2], strict=False))
            )
            flags = str(fields.get("flags", "")).split(",")
            down = {"s_down", "o_down", "disconnected"}
            return (
                "master" in flags
                and not down.intersection(flags)
                and int(fields.get("port", 0)) == self.master.port
            )

    def primaries(self) -> list[redis.Redis]:
        assert self.master is not None
        return [self.master.client()]

    def flushall(self) -> None:
        assert self.master is not None
        with self.master.client() as conn:
            conn.flushall()

    def stop(self) -> None:
        for server in (self.sentinel, self.master):
            if server is not None:
                server.stop()
