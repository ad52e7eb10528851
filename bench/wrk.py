"""wrk runs: a Lua script per target, and the figures wrk's done() hook prints as JSON."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.procs import LOAD_CORE, pinned

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx statuses, socket errors and timeouts
    detail: str

    @property
    def ok_per_second(self) -> float:
        return max(0, self.requests - self.errors) / self.seconds if self.seconds else 0.0


def lua_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def turn_script(
    path: Path, *, key: str, prefix: str, conversations: int, body: bytes, offset: int = 0
) -> Path:
    """POST a turn to /conversations/<prefix><n>/messages, n round-robin over `conversations`.

    Round-robin, not random: a conversation comes back only after `conversations` requests,
    so no two in-flight requests share one (turns of one conversation are serialized)."""
    path.write_text(
        f"""
wrk.method = "POST"
wrk.body = {lua_literal(body.decode())}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {lua_literal("Bearer " + key)}
local n = {offset}
local count = {conversations}
local prefix = {lua_literal("/conversations/" + prefix)}
request = function()
  n = (n + 1) % count
  return wrk.format(nil, prefix .. n .. "/messages")
end
{_DONE}
"""
    )
    return path


def openai_script(path: Path, *, key: str, prefix: str, conversations: int, body: bytes) -> Path:
    """POST /v1/chat/completions with `X-Conversation-Id: <prefix><n>`, n round-robin as in
    turn_script."""
    path.write_text(
        f"""
wrk.method = "POST"
wrk.body = {lua_literal(body.decode())}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {lua_literal("Bearer " + key)}
local n = 0
local count = {conversations}
local prefix = {lua_literal(prefix)}
request = function()
  n = (n + 1) % count
  wrk.headers["X-Conversation-Id"] = prefix .. n
  return wrk.format(nil, "/v1/chat/completions")
end
{_DONE}
"""
    )
    return path


def post_script(path: Path, *, url_path: str, body: bytes, headers: dict[str, str]) -> Path:
    """POST the same body to one path (a stateless endpoint)."""
    lines = "\n".join(
        f"wrk.headers[{lua_literal(k)}] = {lua_literal(v)}" for k, v in headers.items()
    )
    path.write_text(
        f"""
wrk.method = "POST"
wrk.path = {lua_literal(url_path)}
wrk.body = {lua_literal(body.decode())}
wrk.headers["Content-Type"] = "application/json"
{lines}
{_DONE}
"""
    )
    return path


def run_wrk(
    port: int, script: Path, *, connections: int, seconds: float, timeout: float = 5.0
) -> WrkResult:
    argv = pinned(
        LOAD_CORE,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout:g}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(
            f"wrk gave no figures (exit {out.returncode}):\n{out.stdout}{out.stderr}"
        )
    data = orjson.loads(line[6:])
    errors = data["connect"] + data["read"] + data["write"] + data["status"] + data["timeout"]
    detail = ", ".join(
        f"{k} {data[k]}" for k in ("connect", "read", "write", "status", "timeout") if data[k]
    )
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        detail=detail or "no errors",
    )
