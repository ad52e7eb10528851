"""The long conversation: rolling summaries against plain sliding trimming (issue 15.2).

A scripted 300-turn conversation (user and assistant messages of about 80 tokens, budget 4,000,
a Claude model name) goes to the service three times: with SUMMARY=on, with summaries off, and,
as the same run's reference, with plain sliding trimming (TRIM_LOW_WATER=1). The upstream is a
stand-in that caches prompts the way automatic prefix caching does (OpenAI's rules: the longest
prefix of whole messages that an earlier request within 5 minutes began with, in steps of 128
tokens, from 1,024 tokens; cache breakpoints are not part of the prefix) and reports
`prompt_tokens_details.cached_tokens`; it counts tokens with the service's own estimate. Summary
calls get a summary of about 200 tokens after the same delay as turns.

Figures: the share of the window's moves whose summary landed in the same turn (`summary_lag` 0),
the share of input tokens served from cache, and the share of turns that forward the previous
turn's array unchanged with the new messages after it.

`python -m bench.long_conversation serve PORT DELAY` runs the stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.procs import LOAD_CORE, SERVICE_CORE, Proc, free_port, pinned, wait_http

ROOT = Path(__file__).resolve().parent.parent
MODEL = "claude-sonnet-4-6"
TURNS = 300
BUDGET = 4000
CONTENT_CHARS = 300  # (300 + 3) / 4 + 4 = 79 estimated tokens a message
DELAY_SECONDS = 0.02  # each upstream answer, turns and summary calls alike
CACHE_STEP = 128
CACHE_MIN = 1024
CACHE_TTL_SECONDS = 300.0
SUMMARY_CHARS = 800
CLIENT_KEY = "bench-long-client-key"


def _text(seed: str) -> str:
    return (seed + " " + hashlib.sha256(seed.encode()).hexdigest() * 8)[:CONTENT_CHARS]


def _tokens(message: dict[str, Any]) -> int:
    from service.tokens import message_tokens

    return message_tokens(message)


def serve(port: int, delay: float) -> None:
    from aiohttp import web

    # prefix hash -> (tokens of that prefix, last seen)
    seen: dict[bytes, tuple[int, float]] = {}

    def cached_tokens(messages: list[dict[str, Any]]) -> tuple[int, int]:
        now = time.monotonic()
        total, best, chain = 3, 0, hashlib.sha256()
        for message in messages:
            # A cache breakpoint marks where to cache; it is not part of what is cached.
            plain = {k: v for k, v in message.items() if k != "cache_control"}
            if isinstance(plain.get("content"), list):
                plain["content"] = [
                    {k: v for k, v in part.items() if k != "cache_control"}
                    for part in plain["content"]
                    if isinstance(part, dict)
                ]
            chain.update(orjson.dumps(plain, option=orjson.OPT_SORT_KEYS))
            total += _tokens(message)
            key = chain.digest()
            hit = seen.get(key)
            if hit is not None and now - hit[1] <= CACHE_TTL_SECONDS:
                best = hit[0]
            seen[key] = (total, now)
        cached = best // CACHE_STEP * CACHE_STEP
        return total, cached if cached >= CACHE_MIN else 0

    async def completions(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        await asyncio.sleep(delay)
        messages = body["messages"]
        summary_call = "running summary" in str(messages[0].get("content", ""))
        if summary_call:
            content = _text(f"summary {len(messages[1]['content'])}") * 3
            content = content[:SUMMARY_CHARS]
            prompt, cached = sum(_tokens(m) for m in messages) + 3, 0
        else:
            content = _text(f"reply {len(messages)} {messages[-1]['content'][:40]}")
            prompt, cached = cached_tokens(messages)
        output = _tokens({"role": "assistant", "content": content})
        completion = {
            "request_id": "bench",
            "choices": [{"message": {"role": "assistant", "content": content}}],
            "model": body["model"],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": output,
                "total_tokens": prompt + output,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
        return web.Response(body=orjson.dumps(completion), content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


@dataclass
class Figures:
    turns: int = 0
    moves: int = 0
    landed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    stable_turns: int = 0
    summary_calls: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def landed_share(self) -> float:
        return self.landed / self.moves if self.moves else 0.0

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def stable_share(self) -> float:
        return self.stable_turns / max(1, self.turns - 1)


def converse(port: int, conversation: str, turns: int = TURNS) -> Figures:
    """Send the scripted conversation; read what was forwarded from each turn's context."""
    figures = Figures()
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    base = f"http://127.0.0.1:{port}/conversations/{conversation}"
    with httpx.Client(headers=headers, timeout=60.0) as http:
        http.put(base, json={"token_budget": BUDGET, "system": "Answer briefly."})
        dropped, summary = 0, None
        for i in range(turns):
            answer = http.post(
                f"{base}/messages", json={"message": {"role": "user", "content": _text(f"q{i}")}}
            )
            if answer.status_code != 200:
                figures.errors.append(f"turn {i}: {answer.status_code} {answer.text[:200]}")
                break
            body = answer.json()
            context = body["conversation"]["context"]
            usage = body["usage"]
            figures.turns += 1
            figures.prompt_tokens += usage["prompt_tokens"]
            figures.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            if context["dropped_messages"] != dropped:
                figures.moves += 1
                if context.get("summary") is not None and context.get("summary_lag") == 0:
                    figures.landed += 1
            elif i > 0 and context.get("summary") == summary:
                figures.stable_turns += 1  # same start, same summary: the same prefix
            dropped, summary = context["dropped_messages"], context.get("summary")
        figures.summary_calls = http.get(base).json()["summary"]["version"]
    return figures


# The runs: summaries on; off (the window alone); and plain sliding trimming (a window that keeps
# the newest turns that fit: low water 1), the reference every figure is set against.
RUNS: dict[str, dict[str, str]] = {
    "on": {"SUMMARY": "on"},
    "off": {"SUMMARY": "off"},
    "sliding": {"SUMMARY": "off", "TRIM_LOW_WATER": "1"},
}


def _service(workdir: Path, redis_port: int, upstream_port: int, name: str) -> tuple[Proc, int]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "GATEWAY_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "GATEWAY_API_KEY": "bench-upstream-key",
        "API_KEYS": f"bench:{CLIENT_KEY}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",
        "LOG_LEVEL": "warning",
        "DEFAULT_MODEL": MODEL,
        "TOKEN_BUDGET": str(BUDGET),
        "SUMMARY_MAX_TOKENS": "400",
        **RUNS[name],
    }
    argv = pinned(SERVICE_CORE, [sys.executable, "-m", "service"])
    proc = Proc(f"service-long-{name}", argv, log_dir=workdir, env=env, cwd=ROOT)
    wait_http(proc, port, "/readyz", timeout=30)
    return proc, port


def measure(workdir: Path, redis_port: int, turns: int = TURNS) -> dict[str, Figures]:
    """Each of RUNS on a fresh service and stand-in."""
    results: dict[str, Figures] = {}
    for name in RUNS:
        upstream_port = free_port()
        argv = [sys.executable, "-m", "bench.long_conversation", "serve", str(upstream_port)]
        upstream = Proc(
            f"cache-upstream-{name}",
            pinned(LOAD_CORE, [*argv, str(DELAY_SECONDS)]),
            log_dir=workdir,
            cwd=ROOT,
        )
        try:
            wait_http(upstream, upstream_port, "/health", timeout=20)
            service, port = _service(workdir, redis_port, upstream_port, name)
            try:
                results[name] = converse(port, f"long-{name}", turns)
            finally:
                service.stop()
        finally:
            upstream.stop()
    return results


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), float(sys.argv[3]))
