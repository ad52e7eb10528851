"""`python -m bench.instructions`: instructions per turn, the service's and the reference's.

Seconds move by a factor of two or more between machines here, and with whatever else runs; an
instruction count does not: valgrind's callgrind counts the same total for the same binary and
inputs whatever the machine is doing (issue 10: figures any machine can reproduce). Each app, the
service (`service.app.create_app`, settings as `make bench` runs it) and the bench's reference
(`bench/reference.py`), is driven in its own process over ASGI: no HTTP server and no load
generator in the count, only the app's own turn. 32 turns at a time (`--concurrency`: another
number; 1 is make bench's one-connection latency row), each on one of 2,000
conversations of 20 stored messages (`--window`: another size, all forwarded; 200 is make bench's
200-message row), against a real Redis and the bench's upstream (both in other
processes); after a warm-up, callgrind counts `--turns` turns. Prints instructions per turn for
both and their ratio; with `--features`, also the service's turn with the new features on (a Claude
model: cache breakpoints; summaries on, not due) against off, as `make bench`'s features row.
Needs valgrind (`apt-get install valgrind`); `make bench-instructions`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from redis import Redis

from bench import reference
from bench.procs import LOAD_CORE, SERVICE_CORE, Proc, free_port, pinned, wait_http, wait_port
from bench.run import CLAUDE_MODEL, CLIENT_KEY, FEATURE_BUDGET, TENANT, service_settings
from bench.seed import seed, seed_calibration
from bench.upstreams import MODEL, USER_TEXT, WINDOW_MESSAGES, token_budget
from service.__main__ import GC_THRESHOLDS

ROOT = Path(__file__).resolve().parent.parent
POOL = 2000  # conversations per app: 32 in flight never share one
CONCURRENCY = 32  # the default: make bench's throughput rows run 32 connections
WARM_UP = 300
# Each target's conversations (seeded alike, 20 messages) and the model its turns name.
TARGETS = {
    "service": ("t", MODEL),
    "reference": ("t", MODEL),
    "features-off": ("f", MODEL),  # their own budget: no trimming, as features-on
    "features-on": ("g", CLAUDE_MODEL),  # and summaries on in their metadata
}
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def _body(model: str) -> bytes:
    return orjson.dumps({"model": model, "message": {"role": "user", "content": USER_TEXT}})


def _scope(conversation: str, body: bytes) -> dict[str, Any]:
    path = f"/conversations/{conversation}/messages"
    headers = [
        (b"host", b"bench"),
        (b"authorization", f"Bearer {CLIENT_KEY}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 50000),
        "headers": headers,
    }


async def _turn(app: ASGIApp, conversation: str, body: bytes) -> int:
    """One POST through the app; its status."""
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect while the answer is written
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(conversation, body), receive, send)
    return status


async def _turns(app: ASGIApp, target: str, first: int, count: int, concurrency: int) -> int:
    """`count` turns, `concurrency` at a time; the number that were not 200."""
    prefix, model = TARGETS[target]
    body = _body(model)
    numbers = iter(range(first, first + count))
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for n in numbers:
            if await _turn(app, f"{prefix}{n % POOL}", body) != 200:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


def _callgrind(instrument: bool) -> None:
    switch = "on" if instrument else "off"
    subprocess.run(
        ["callgrind_control", "-i", switch, str(os.getpid())], check=True, stdout=subprocess.DEVNULL
    )


def _app(target: str, redis_url: str, upstream: str, window: int) -> Any:
    if target == "reference":
        return reference.create_app(redis_url, f"{upstream}/v1/chat/completions", window)
    from service.app import create_app
    from service.config import Settings
    from service.logs import configure_logging

    configure_logging("info")
    budget = token_budget(window)
    settings = Settings.model_validate(service_settings(redis_url, f"{upstream}/v1", budget))
    return create_app(settings)


async def _child(
    target: str, redis_url: str, upstream: str, turns: int, window: int, concurrency: int
) -> None:
    from asgi_lifespan import LifespanManager

    async with LifespanManager(_app(target, redis_url, upstream, window)) as manager:
        failed = await _turns(manager.app, target, 0, WARM_UP, concurrency)
        if target != "reference":  # as `python -m service` does at start-up (the reference,
            # under plain uvicorn in make bench, keeps CPython's defaults)
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
        _callgrind(True)
        failed += await _turns(manager.app, target, WARM_UP, turns, concurrency)
        _callgrind(False)
    if failed:
        raise SystemExit(f"{target}: {failed} turns failed")


def _count(
    target: str,
    redis_url: str,
    upstream: str,
    turns: int,
    window: int,
    concurrency: int,
    workdir: Path,
) -> int:
    out = workdir / f"callgrind.{target}.out"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    argv += [sys.executable, "-m", "bench.instructions", "--child", target]
    argv += ["--redis", redis_url, "--upstream", upstream, "--turns", str(turns)]
    argv += ["--window", str(window), "--concurrency", str(concurrency)]
    log = workdir / f"{target}.log"
    with log.open("wb") as sink:
        done = subprocess.run(pinned(SERVICE_CORE, argv), cwd=ROOT, stdout=sink, stderr=sink)
    # "totals:" is the whole run's count ("summary:" only what the last dump saw)
    totals = re.search(rb"^totals: (\d+)", out.read_bytes() if out.exists() else b"", re.M)
    if done.returncode != 0 or totals is None:
        raise RuntimeError(
            f"{target} under callgrind failed:\n{log.read_text(errors='replace')[-2000:]}"
        )
    return int(totals.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--turns", type=int, default=300, help="turns counted per app")
    parser.add_argument("--features", action="store_true", help="also features on against off")
    parser.add_argument(
        "--window",
        type=int,
        default=WINDOW_MESSAGES,
        help="stored messages per conversation, all forwarded (200: make bench's wide row)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help="turns at a time (1: make bench's one-connection latency row)",
    )
    parser.add_argument("--child", choices=sorted(TARGETS), help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.features and args.window != WINDOW_MESSAGES:
        parser.error("--features measures 21-message windows (make bench's features row)")
    if args.child:
        import uvloop  # the loop both servers run on under uvicorn

        uvloop.run(
            _child(args.child, args.redis, args.upstream, args.turns, args.window, args.concurrency)
        )
        return 0
    missing = [
        tool for tool in ("valgrind", "callgrind_control", "redis-server") if not shutil.which(tool)
    ]
    if missing:
        print(f"missing tools: install {' '.join(missing)} (Debian: valgrind, redis-server)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    redis_port, upstream_port = free_port(), free_port()
    redis_argv = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
    redis_proc = Proc("redis", pinned(LOAD_CORE, redis_argv), log_dir=workdir)
    upstream_argv = [sys.executable, "-m", "bench.upstreams", str(upstream_port), "0"]
    upstream_argv.append(str(args.window))  # its usage reports the whole array: no correction
    upstream_proc = Proc("upstream", pinned(LOAD_CORE, upstream_argv), log_dir=workdir, cwd=ROOT)
    try:
        wait_port(redis_proc, redis_port, timeout=10)
        wait_http(upstream_proc, upstream_port, "/health", timeout=20)
        redis = Redis(port=redis_port)
        seed_calibration(redis, TENANT, [MODEL, CLAUDE_MODEL])
        seed(redis, TENANT, "t", POOL, args.window)
        seed(redis, reference.TENANT, "t", POOL, args.window)
        targets = ["service", "reference"]
        if args.features:
            seed(redis, TENANT, "f", POOL, WINDOW_MESSAGES, meta={"token_budget": FEATURE_BUDGET})
            features = {"token_budget": FEATURE_BUDGET, "summary_enabled": "true"}
            seed(redis, TENANT, "g", POOL, WINDOW_MESSAGES, meta=features)
            targets += ["features-off", "features-on"]
        redis_url, upstream = (
            f"redis://127.0.0.1:{redis_port}/0",
            f"http://127.0.0.1:{upstream_port}",
        )
        counts = {
            target: _count(
                target, redis_url, upstream, args.turns, args.window, args.concurrency, workdir
            )
            / args.turns
            for target in targets
        }
    finally:
        upstream_proc.stop()
        redis_proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    service, ref = counts["service"], counts["reference"]
    print(
        f"instructions per turn ({args.turns} turns, {args.concurrency} at a time, "
        f"{args.window + 1}-message windows):"
    )
    print(f"  service    {service / 1e6:7.3f} M")
    print(f"  reference  {ref / 1e6:7.3f} M")
    print(f"  ratio      {service / ref:7.2f}x the reference")
    if args.features:
        on, off = counts["features-on"], counts["features-off"]
        print(f"  features on {on / 1e6:6.3f} M, off {off / 1e6:6.3f} M: {on / off:.3f}x off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
