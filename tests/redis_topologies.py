"""Real Redis topologies for tests: a 3-primary Redis Cluster and a Sentinel watching one primary.

Each is a set of redis-server child processes in a temporary directory on free ports, started and
awaited by polling (never by sleeping a fixed time), and stopped by `stop()`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis

from tests.conftest import free_port
from tests.polling import wait_until

_NOT_YET = (redis.RedisError, OSError)  # a server still starting, or a topology still settling

CLUSTER_SLOTS = 16384
SENTINEL_MASTER = "mymaster"


def server_binary() -> str:
    """Redis 7 from PATH: CLUSTER ADDSLOTSRANGE and `cluster-port` need 7.0."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server (7.0 or later) is not on PATH")
    return found


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

        wait_until(answers, what=f"redis-server on port {self.port}", ignore=_NOT_YET)

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

        wait_until(formed, what="cluster_state:ok on every node", ignore=_NOT_YET)

    def primaries(self) -> list[redis.Redis]:
        return [node.client() for node in self.nodes]

    def owner(self, slot: int, *, seen_by: int = 0) -> int:
        """The index in `nodes` of the primary serving `slot`, as nodes[seen_by] sees it."""
        with self.nodes[seen_by].client() as conn:
            rows = conn.execute_command("CLUSTER", "SLOTS")
        (port,) = {int(row[2][1]) for row in rows if int(row[0]) <= slot <= int(row[1])}
        (index,) = [i for i, node in enumerate(self.nodes) if node.port == port]
        return index

    def move_slot(self, slot: int, target: int) -> None:
        """Reshard one slot, keys and all, to nodes[target] (as `redis-cli --cluster reshard`)."""
        source = self.owner(slot)
        ids = []
        for node in self.nodes:
            with node.client() as conn:
                ids.append(_text(conn.execute_command("CLUSTER", "MYID")))
        with self.nodes[target].client() as to, self.nodes[source].client() as src:
            to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command(
                    "MIGRATE", "127.0.0.1", self.nodes[target].port, "", 0, 5000, "KEYS", *keys
                )
        for index in (target, source, *range(self.size)):
            with self.nodes[index].client() as conn:
                conn.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        wait_until(
            lambda: all(self.owner(slot, seen_by=i) == target for i in range(self.size)),
            what="every node to agree on the moved slot",
            ignore=_NOT_YET,
        )

    def flushall(self) -> None:
        for node in self.nodes:
            with node.client() as conn:
                conn.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class LocalSentinel:
    """One primary (plus optional replicas) and one Sentinel monitoring it with quorum 1."""

    def __init__(
        self,
        directory: Path,
        master_name: str = SENTINEL_MASTER,
        *,
        replicas: int = 0,
        down_after_ms: int = 5000,
    ) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.master_name = master_name
        self.replica_count = replicas
        self.master: _Server | None = None
        self.replicas: list[_Server] = []
        self.sentinel: _Server | None = None

    @property
    def url(self) -> str:
        assert self.sentinel is not None
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.master_name}"

    def start(self) -> str:
        try:
            self.master = _Server(self.directory / "master", free_port(), [])
            self.master.wait_ready()
            for index in range(self.replica_count):
                replica = _Server(
                    self.directory / f"replica{index}",
                    free_port(),
                    [f"replicaof 127.0.0.1 {self.master.port}"],
                )
                self.replicas.append(replica)
                replica.wait_ready()
            wait_until(
                self._replicas_linked, what="replicas to sync with the primary", ignore=_NOT_YET
            )
            self.sentinel = _Server(
                self.directory / "sentinel",
                free_port(),
                [
                    f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1",
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master_name} 10000",
                ],
                sentinel=True,
            )
            self.sentinel.wait_ready()
            wait_until(
                self._master_seen, what=f"sentinel to see {self.master_name} up", ignore=_NOT_YET
            )
            wait_until(
                self._replicas_seen, what="sentinel to discover the replicas", ignore=_NOT_YET
            )
        except BaseException:
            self.stop()
            raise
        return self.url

    def _replicas_linked(self) -> bool:
        for replica in self.replicas:
            with replica.client() as conn:
                if conn.info("replication").get("master_link_status") != "up":
                    return False
        return True

    def _replicas_seen(self) -> bool:
        assert self.sentinel is not None
        with self.sentinel.client() as conn:
            known = conn.execute_command("SENTINEL", "REPLICAS", self.master_name)
        healthy = [
            r for r in known if "disconnected" not in str(_fields(r).get("flags", "")).split(",")
        ]
        return len(healthy) >= len(self.replicas)

    def primary_port(self) -> int:
        """The port of the primary as the Sentinel sees it now."""
        assert self.sentinel is not None
        with self.sentinel.client() as conn:
            _host, port = conn.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
            )
        return int(port)

    def kill_primary(self) -> int:
        """Stop the primary's process and wait until the Sentinel has promoted a replica and it
        serves as primary; returns the new primary's port."""
        assert self.replicas
        old = self.primary_port()
        self._server(old).stop()

        def promoted() -> bool:
            port = self.primary_port()
            if port == old:
                return False
            with self._server(port).client() as conn:
                return bool(conn.info("replication").get("role") == "master")

        wait_until(promoted, what="the Sentinel to promote a replica", ignore=_NOT_YET)
        return self.primary_port()

    def _server(self, port: int) -> _Server:
        servers = [s for s in (self.master, *self.replicas) if s is not None]
        (found,) = [s for s in servers if s.port == port]
        return found

    def _master_seen(self) -> bool:
        assert self.sentinel is not None
        assert self.master is not None
        with self.sentinel.client() as conn:
            fields = _fields(conn.execute_command("SENTINEL", "MASTER", self.master_name))
            flags = str(fields.get("flags", "")).split(",")
            down = {"s_down", "o_down", "disconnected"}
            return (
                "master" in flags
                and not down.intersection(flags)
                and int(fields.get("port", 0)) == self.master.port
            )

    def primaries(self) -> list[redis.Redis]:
        return [self._server(self.primary_port()).client()]

    def flushall(self) -> None:
        with self._server(self.primary_port()).client() as conn:
            conn.flushall()

    def stop(self) -> None:
        for server in (self.sentinel, *self.replicas, self.master):
            if server is not None:
                server.stop()


def _fields(reply: object) -> dict[str, Any]:
    """A Sentinel reply as a dict, whether redis-py already made it one or left it flat."""
    if isinstance(reply, dict):
        return reply
    assert isinstance(reply, list)
    return dict(zip(reply[::2], reply[1::2], strict=False))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
