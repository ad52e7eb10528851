"""Upstreams for the bench: nginx answering a canned completion, and a slow Python one.

`python -m bench.upstreams PORT DELAY_SECONDS` serves the canned completion after DELAY_SECONDS
(aiohttp on uvloop), for the in-flight run where nginx cannot wait.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from service.tokens import SAFETY_MARGIN, corrected

# Every stored message in the bench is this long: 4 + 80/4 = 24 estimated tokens each.
CONTENT_CHARS = 80
MESSAGE_TOKENS = 24
WINDOW_MESSAGES = 20
WIDE_WINDOW_MESSAGES = 200  # the realistic case: a 16k budget of ~80-token messages


def array_tokens(window: int) -> int:
    """The forwarded array of a `window`-message window plus the new message (the estimate)."""
    return 3 + MESSAGE_TOKENS * (window + 1)


def token_budget(window: int) -> int:
    """`window / 2` whole turns fit, one more does not: the window stays `window` messages. The
    service compares the array's estimate times its correction factor with the budget; with the
    upstream reporting exactly the estimate, the factor settles at SAFETY_MARGIN (seeded so from the
    start: bench/seed.py), so the budget is the corrected size of the array."""
    return corrected(array_tokens(window), SAFETY_MARGIN) + MESSAGE_TOKENS // 2


ARRAY_TOKENS = array_tokens(WINDOW_MESSAGES)
TOKEN_BUDGET = token_budget(WINDOW_MESSAGES)
MODEL = "bench-model"

REPLY_TEXT = ("The bench upstream answers every request with this same reply. " * 2)[:CONTENT_CHARS]
USER_TEXT = ("A user message of the bench, always the same length and text. " * 2)[:CONTENT_CHARS]


def completion(window: int) -> bytes:
    """Usage reports exactly the service's estimate of a `window`-message window, so the
    per-model correction factor stays at 1 and windows stay at `window` messages."""
    prompt = array_tokens(window)
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "request_id": "00000000-0000-4000-8000-000000000000",
            "object": "chat.completion",
            "created": 1764000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY_TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "input_tokens": prompt,
                "output_tokens": MESSAGE_TOKENS,
                "total_tokens": prompt + MESSAGE_TOKENS,
                "prompt_tokens": prompt,
                "completion_tokens": MESSAGE_TOKENS,
            },
        }
    )


COMPLETION = completion(WINDOW_MESSAGES)
WIDE_PATH = "/wide"  # the upstream's base path for 200-message windows: their own usage figure


def nginx_conf(workdir: Path, port: int) -> Path:
    """A minimal nginx.conf: one worker, no logs, POST /v1/chat/completions -> COMPLETION, and
    {WIDE_PATH}/v1/chat/completions -> the completion of a 200-message window."""
    body, wide = COMPLETION.decode(), completion(WIDE_WINDOW_MESSAGES).decode()
    # Literals inside single-quoted nginx strings: no quote, no variable.
    assert "'" not in body + wide
    assert "$" not in body + wide
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    client_body_buffer_size 1m;
    client_max_body_size 16m;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=8192;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{body}';
        }}
        location = {WIDE_PATH}/v1/chat/completions {{
            default_type application/json;
            return 200 '{wide}';
        }}
        location / {{ return 404; }}
    }}
}}
"""
    )
    return conf


def serve_slow(port: int, delay: float, window: int = WINDOW_MESSAGES) -> None:
    from aiohttp import web

    answer = completion(window)

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay)
        return web.Response(body=answer, content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, backlog=8192, print=None)


if __name__ == "__main__":
    window = int(sys.argv[3]) if len(sys.argv) > 3 else WINDOW_MESSAGES  # its usage's array
    serve_slow(int(sys.argv[1]), float(sys.argv[2]), window)
