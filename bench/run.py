"""`python -m bench`: start Redis, the upstreams and the service, measure, stop, print one table.

Layout: the service (and, for the baseline, LiteLLM's proxy) runs alone on core 0; wrk, nginx,
the slow upstream and Redis share core 1. bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from redis import Redis

from bench import litellm, long_conversation, reference, upstreams
from bench.procs import (
    LOAD_CORE,
    SERVICE_CORE,
    Proc,
    busy_cores,
    cpu_seconds,
    ensure_tools,
    free_port,
    machine,
    pinned,
    raise_nofile,
    wait_http,
    wait_port,
)
from bench.seed import seed, seed_calibration
from bench.upstreams import (
    MODEL,
    TOKEN_BUDGET,
    USER_TEXT,
    WIDE_PATH,
    WIDE_WINDOW_MESSAGES,
    WINDOW_MESSAGES,
    token_budget,
)
from bench.wrk import WrkResult, openai_script, post_script, run_wrk, turn_script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TENANT = "bench"
CLIENT_KEY = "bench-client-key-0123456789"
UPSTREAM_KEY = "bench-upstream-key"
POOL = 4000  # conversations for the 20-message runs (round-robin: never two turns at once)
WIDE_POOL = 1000  # conversations of 200 stored messages
HISTORY_SMALL, HISTORY_LARGE = 10, 10_000
SLOW_DELAY = 0.5
# The features-on figure: a Claude model name (cache breakpoints placed from CACHE_MIN_TOKENS)
# and summaries on, in conversations whose own budget is far from reached (no summary is due).
CLAUDE_MODEL = "claude-sonnet-4-6"
FEATURE_BUDGET = "8000"
FEATURE_MIN_TOKENS = 256  # a 21-message array (~500 tokens) gets its breakpoints


def service_settings(
    redis_url: str, gateway_url: str, budget: int = TOKEN_BUDGET
) -> dict[str, str]:
    """The bench's service settings by field name (its environment upper-cases them;
    bench/instructions.py validates them in process), so both measure the same service."""
    return {
        "redis_url": redis_url,
        "gateway_url": gateway_url,
        "gateway_api_key": UPSTREAM_KEY,
        "api_keys": f"{TENANT}:{CLIENT_KEY}",
        "token_budget": str(budget),
        "default_model": MODEL,
        # Sliding trimming: every window is exactly the reference's (the default low-water mark
        # jumps the window back to 60% of the budget, and would forward less).
        "trim_low_water": "1",
        "cache_min_tokens": str(FEATURE_MIN_TOKENS),
    }


@dataclass
class Row:
    figure: str
    target: str
    service: str = "not measured"
    passed: bool | None = None
    litellm: str = "n/a (stateless)"
    reference: str = ""  # the bench's reference turn (bench/reference.py), same run
    ratio: str = ""  # the service's figure against the reference (or the row's own base)


@dataclass(frozen=True)
class Sequential:
    """Turns one at a time (Bench.sequential_turns) and what Redis did meanwhile."""

    statuses: list[int]
    reads: int  # read events: round trips
    calls: dict[str, int]  # commands by name, those inside scripts included
    redis_cpu: float  # seconds, user + sys


@dataclass(frozen=True)
class Load:
    """One target's share of interleaved runs: medians over rounds, CPU per answered turn."""

    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float  # user+sys of the pinned process, over every round, per ok turn

    def text(self) -> str:
        return (
            f"{self.per_second:,.0f}/s, p50 {self.p50_ms:.2f} / p99 {self.p99_ms:.2f} ms, "
            f"errors {self.errors}"
        )


ROWS = {
    "latency": (
        "Added latency, 1 connection (p50 / p99), 21-message windows",
        "p50 <= ref + 0.2 ms, p99 <= ref + 0.5 ms",
    ),
    "throughput": (
        "Throughput, 32 connections, 21-message windows, 1 worker",
        ">= 1.2x ref, 0 errors",
    ),
    "openai": (
        "Added latency, 1 connection, POST /v1/chat/completions (p50 / p99), 21-message windows",
        "beside our own route's",
    ),
    "cpu": ("CPU per turn (user+sys / turns), 32 connections", "<= 1.0x ref"),
    "floor": (
        "Floor: the reference without Redis (FastAPI, uvicorn, aiohttp alone), 32 connections",
        "none (what 1.2x the reference leaves for the rest)",
    ),
    "wide": (
        "Throughput, 32 connections, 200-message windows",
        ">= 0.5x the 21-message figure, 0 errors",
    ),
    "features": (
        "Features on: Claude model (cache breakpoints), summaries on but not due",
        ">= 0.95x features off, 0 errors",
    ),
    "history": ("History independence: p50 at 10,000 stored minus at 10", "<= 0.5 ms"),
    "in_flight": (
        "In flight: 500 connections, upstream waits 500 ms",
        ">= 0.95x the upstream alone, 0 errors",
    ),
    "round_trips": ("Redis round trips per uncontended turn", "<= 2"),
    "memory": ("Redis memory: bytes per stored message beyond its JSON", "<= 100"),
    "summary_landed": (
        "Long conversation, summaries on: window moves whose summary landed with them",
        ">= 95%",
    ),
    "summary_cached": (
        "Long conversation, summaries on: input tokens from cache",
        ">= 75%",
    ),
}


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    redis_port: int = 0
    nginx_port: int = 0
    redis: Redis | None = None
    procs: list[Proc] = field(default_factory=list)
    rows: dict[str, Row] = field(
        default_factory=lambda: {key: Row(*texts) for key, texts in ROWS.items()}
    )
    target: Proc | None = None  # the proxy under test: checked after every run
    main: tuple[Proc, int] | None = None  # the service on nginx
    ref: tuple[Proc, int] | None = None  # the reference on nginx, 21-message windows
    floor: tuple[Proc, int] | None = None  # the reference without Redis, on nginx
    failures: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    # ---- processes -------------------------------------------------------------------------

    def start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc is self.target:
            self.target = None
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def start_redis(self) -> None:
        self.redis_port = free_port()
        argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--maxclients", "10000"]
        argv += ["--dir", str(self.workdir)]
        proc = self.start(Proc("redis", pinned(LOAD_CORE, argv), log_dir=self.workdir))
        wait_port(proc, self.redis_port, timeout=10)
        self.redis = Redis(port=self.redis_port)

    def start_nginx(self) -> None:
        self.nginx_port = free_port()
        conf = upstreams.nginx_conf(self.workdir, self.nginx_port)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        argv = [nginx, "-p", str(self.workdir), "-c", str(conf)]
        argv += ["-e", str(self.workdir / "nginx-error.log")]
        proc = self.start(Proc("nginx", pinned(LOAD_CORE, argv), log_dir=self.workdir))
        wait_port(proc, self.nginx_port, timeout=10)

    def start_slow_upstream(self) -> tuple[Proc, int]:
        port = free_port()
        argv = [sys.executable, "-m", "bench.upstreams", str(port), str(SLOW_DELAY)]
        proc = Proc("slow-upstream", pinned(LOAD_CORE, argv), log_dir=self.workdir, cwd=ROOT)
        self.start(proc)
        wait_http(proc, port, "/health", timeout=20)
        return proc, port

    def start_reference(
        self, upstream_port: int, name: str, window: int, base: str = "", *, redis: bool = True
    ) -> tuple[Proc, int]:
        """The reference (bench/reference.py); without `redis`, the floor."""
        port = free_port()
        upstream = f"http://127.0.0.1:{upstream_port}{base}/v1/chat/completions"
        argv = [sys.executable, "-m", "bench.reference", str(port)]
        argv += [f"redis://127.0.0.1:{self.redis_port}/0" if redis else "-", upstream, str(window)]
        proc = Proc(name, pinned(SERVICE_CORE, argv), log_dir=self.workdir, cwd=ROOT)
        self.start(proc)
        wait_http(proc, port, "/openapi.json", timeout=30)
        return proc, port

    def start_service(
        self,
        upstream_port: int,
        name: str,
        *,
        base: str = "",
        budget: int = TOKEN_BUDGET,
    ) -> tuple[Proc, int]:
        port = free_port()
        redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        gateway_url = f"http://127.0.0.1:{upstream_port}{base}/v1"
        settings = service_settings(redis_url, gateway_url, budget)
        env = {
            **os.environ,
            **{name.upper(): value for name, value in settings.items()},
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": "1",
            "LOG_LEVEL": self.args.log_level,
        }
        argv = pinned(SERVICE_CORE, [sys.executable, "-m", "service"])
        proc = self.start(Proc(name, argv, log_dir=self.workdir, env=env, cwd=ROOT))
        wait_http(proc, port, "/readyz", timeout=30)
        self.target = proc
        return proc, port

    # ---- load ------------------------------------------------------------------------------

    def script(self, name: str, prefix: str, conversations: int, model: str = MODEL) -> Path:
        body = orjson.dumps({"model": model, "message": {"role": "user", "content": USER_TEXT}})
        return turn_script(
            self.workdir / f"{name}.lua",
            key=CLIENT_KEY,
            prefix=prefix,
            conversations=conversations,
            body=body,
        )

    def direct_script(self, name: str, headers: dict[str, str]) -> Path:
        """The array the service forwards for a 20-message window: same size, same shape."""
        history = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text}
            for i, text in enumerate(
                [USER_TEXT, upstreams.REPLY_TEXT] * (WINDOW_MESSAGES // 2) + [USER_TEXT]
            )
        ]
        body = orjson.dumps({"model": MODEL, "messages": history})
        return post_script(
            self.workdir / f"{name}.lua",
            url_path="/v1/chat/completions",
            body=body,
            headers=headers,
        )

    def wrk(self, port: int, script: Path, connections: int, seconds: float) -> WrkResult:
        result = run_wrk(port, script, connections=connections, seconds=seconds)
        if self.target is not None and not self.target.alive():
            raise RuntimeError(f"{self.target.name} died during the run: {self.target.exit_text()}")
        print(
            f"  wrk c={connections} {script.stem}: {result.ok_per_second:,.0f}/s "
            f"p50 {result.p50_ms:.3f} ms p99 {result.p99_ms:.3f} ms, {result.detail}",
            flush=True,
        )
        return result

    def interleaved(
        self, runs: dict[str, Callable[[], WrkResult]], rounds: int
    ) -> dict[str, tuple[float, float, int]]:
        """Each run once per round, alternating; (median p50, median p99, errors) per run."""
        got: dict[str, list[WrkResult]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                got[name].append(run())
        return {
            name: (
                statistics.median(r.p50_ms for r in results),
                statistics.median(r.p99_ms for r in results),
                sum(r.errors for r in results),
            )
            for name, results in got.items()
        }

    def __post_init__(self) -> None:
        baseline = "skipped (--no-litellm)" if self.args.no_litellm else "not run"
        self.rows["latency"].litellm = self.rows["throughput"].litellm = baseline
        self.rows["in_flight"].litellm = "not measured"

    def record(self, key: str, text: str, passed: bool) -> None:
        self.rows[key].service = text
        self.rows[key].passed = passed

    def phase(self, key: str, run: Callable[[], None]) -> None:
        """Run one measurement; a failure is written in its row and the bench goes on."""
        try:
            run()
        except Exception as exc:
            text = " ".join(str(exc).split())[:160] or type(exc).__name__
            print(f"  {key} failed: {text}", file=sys.stderr, flush=True)
            self.record(key, f"failed: {text}", False)
            self.failures.append(key)

    def service(self) -> int:
        """The port of the service on nginx, (re)started and warmed up when needed."""
        if self.main is not None and self.main[0].alive():
            self.target = self.main[0]
            return self.main[1]
        if self.main is not None:
            print(f"  restarting the service ({self.main[0].exit_text()})", file=sys.stderr)
            self.stop(self.main[0])
        self.main = self.start_service(self.nginx_port, "service")
        self.wrk(self.main[1], self.script("warmup", "t", POOL), 32, 2)
        return self.main[1]

    def reference(self) -> int:
        """The port of the reference on nginx (21-message windows), started when needed."""
        if self.ref is not None and self.ref[0].alive():
            self.target = self.ref[0]
            return self.ref[1]
        if self.ref is not None:
            print(f"  restarting the reference ({self.ref[0].exit_text()})", file=sys.stderr)
            self.stop(self.ref[0])
        self.ref = self.start_reference(self.nginx_port, "reference", WINDOW_MESSAGES)
        self.target = self.ref[0]
        self.wrk(self.ref[1], self.script("warmup-ref", "t", POOL), 32, 2)
        return self.ref[1]

    def start_floor(self) -> tuple[Proc, int]:
        """The floor on nginx (21-message windows), warmed up."""
        self.floor = self.start_reference(self.nginx_port, "floor", WINDOW_MESSAGES, redis=False)
        self.wrk(self.floor[1], self.script("warmup-floor", "t", POOL), 32, 2)
        return self.floor

    def loads(
        self, runs: dict[str, tuple[Proc, int, Path]], connections: int = 32
    ) -> dict[str, Load]:
        """Each (process, port, script) warmed up, then once per round, alternating: same-run
        figures with the CPU time the pinned process spent per answered turn."""
        for proc, port, script in runs.values():
            self.target = proc
            self.wrk(port, script, connections, 2)
        got: dict[str, list[WrkResult]] = {name: [] for name in runs}
        cpu = dict.fromkeys(runs, 0.0)
        for _ in range(self.args.tp_rounds):
            for name, (proc, port, script) in runs.items():
                self.target = proc
                before = cpu_seconds(proc.pid)
                got[name].append(self.wrk(port, script, connections, self.args.tp_seconds))
                cpu[name] += cpu_seconds(proc.pid) - before
        loads = {}
        for name, results in got.items():
            ok = sum(max(0, r.requests - r.errors) for r in results)
            loads[name] = Load(
                per_second=statistics.median(r.ok_per_second for r in results),
                p50_ms=statistics.median(r.p50_ms for r in results),
                p99_ms=statistics.median(r.p99_ms for r in results),
                errors=sum(r.errors for r in results),
                cpu_us=cpu[name] / ok * 1e6 if ok else float("nan"),
            )
            self.raw[f"load_{name}"] = [asdict(r) for r in results] + [asdict(loads[name])]
        return loads

    # ---- phases ----------------------------------------------------------------------------

    def seed_all(self) -> None:
        assert self.redis is not None
        print("seeding conversations ...", flush=True)
        seed_calibration(self.redis, TENANT, [MODEL, CLAUDE_MODEL])
        seed(self.redis, TENANT, "t", POOL, WINDOW_MESSAGES)
        seed(self.redis, reference.TENANT, "t", POOL, WINDOW_MESSAGES)
        seed(self.redis, TENANT, "o", POOL, WINDOW_MESSAGES)  # for /v1/chat/completions
        seed(self.redis, TENANT, "s", 2000, HISTORY_SMALL)
        seed(self.redis, TENANT, "w", WIDE_POOL, WIDE_WINDOW_MESSAGES)
        seed(self.redis, reference.TENANT, "w", WIDE_POOL, WIDE_WINDOW_MESSAGES)
        seed(self.redis, TENANT, "f", POOL, WINDOW_MESSAGES, meta={"token_budget": FEATURE_BUDGET})
        features = {"token_budget": FEATURE_BUDGET, "summary_enabled": "true"}
        seed(self.redis, TENANT, "g", POOL, WINDOW_MESSAGES, meta=features)
        # Memory per message: Redis's used_memory grows by the JSON plus this much per message.
        self.redis.execute_command("MEMORY", "PURGE")
        before = int(self.redis.info("memory")["used_memory"])
        count = 4
        json_bytes = seed(self.redis, TENANT, "l", count, HISTORY_LARGE)
        after = int(self.redis.info("memory")["used_memory"])
        messages = count * HISTORY_LARGE
        per_message = (after - before - json_bytes) / messages
        usage = sum(
            int(self.redis.memory_usage(f"conv:{{{TENANT}:l{n}}}:log", samples=0) or 0)
            for n in range(count)
        )
        self.raw["memory"] = {
            "messages": messages,
            "json_bytes": json_bytes,
            "used_memory_delta": after - before,
            "memory_usage_logs": usage,
        }
        self.record(
            "memory",
            f"{per_message:.1f} B (JSON {json_bytes / messages:.0f} B/message; "
            f"MEMORY USAGE of the lists: {(usage - json_bytes) / messages:.1f} B)",
            per_message <= 100,
        )

    def latency(self) -> None:
        print("added latency, 1 connection (direct, through the service and the reference)")
        port, ref_port = self.service(), self.reference()
        direct = self.direct_script("direct", {"Authorization": UPSTREAM_KEY})
        via = self.script("latency", "t", POOL)
        via_ref = self.script("latency-ref", "t", POOL)  # the same turns; its own name in the log
        runs = {
            "direct": lambda: self.wrk(self.nginx_port, direct, 1, self.args.short),
            "service": lambda: self.wrk(port, via, 1, self.args.short),
            "reference": lambda: self.wrk(ref_port, via_ref, 1, self.args.short),
        }
        openai = _has_path(port, "/v1/chat/completions")
        if openai:  # the OpenAI-compatible route (issue 12), where this service has it
            body = orjson.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": USER_TEXT}]}
            )
            compat = openai_script(
                self.workdir / "openai.lua",
                key=CLIENT_KEY,
                prefix="o",
                conversations=POOL,
                body=body,
            )
            self.wrk(port, compat, 32, 2)  # warm-up
            runs["openai"] = lambda: self.wrk(port, compat, 1, self.args.short)
        figures = self.interleaved(runs, self.args.rounds)
        d50, d99, derr = figures["direct"]
        s50, s99, serr = figures["service"]
        r50, r99, rerr = figures["reference"]
        self.raw["latency"] = figures
        added50, added99 = s50 - d50, s99 - d99
        ref50, ref99 = r50 - d50, r99 - d99
        self.record(
            "latency",
            f"+{added50:.3f} / +{added99:.3f} ms (direct {d50:.3f} / {d99:.3f}, "
            f"through {s50:.3f} / {s99:.3f}; errors {derr + serr})",
            added50 <= ref50 + 0.2 and added99 <= ref99 + 0.5 and derr + serr == 0,
        )
        self.rows["latency"].reference = f"+{ref50:.3f} / +{ref99:.3f} ms (errors {rerr})"
        self.rows["latency"].ratio = (
            f"{added50 - ref50:+.3f} / {added99 - ref99:+.3f} ms; "
            f"{_ratio(added50, ref50)} / {_ratio(added99, ref99)}"
        )
        if not openai:
            self.rows["openai"].service = "not measured (the service has no such route)"
            return
        o50, o99, oerr = figures["openai"]
        self.record(
            "openai",
            f"+{o50 - d50:.3f} / +{o99 - d99:.3f} ms (errors {oerr}; our route "
            f"+{added50:.3f} / +{added99:.3f})",
            oerr == 0,
        )
        self.rows["openai"].reference = self.rows["latency"].reference
        self.rows["openai"].ratio = (
            f"{o50 - s50:+.3f} / {o99 - s99:+.3f} ms vs our route; "
            f"{o50 - d50 - ref50:+.3f} / {o99 - d99 - ref99:+.3f} ms vs ref"
        )

    def round_trips(self, port: int, turns: int = 300) -> None:
        """Sequential, uncontended turns; Redis counts its read events and commands, and the CPU
        it spent (beside the same turns of the reference: one Redis serves every replica)."""
        print(f"redis round trips: {turns} sequential turns", flush=True)
        forwarded: list[int] = []
        ours = self.sequential_turns(port, turns, forwarded)
        ref = self.sequential_turns(self.reference(), turns, None)
        per_turn = ours.reads / turns
        failed = sum(1 for s in ours.statuses + ref.statuses if s != 200)
        calls = ours.calls
        scripts = (calls.get("evalsha", 0) + calls.get("eval", 0)) / turns
        listed = ", ".join(f"{k} {v / turns:.2f}" for k, v in sorted(calls.items()))
        self.raw["round_trips"] = {
            "turns": turns,
            "reads": ours.reads,
            "calls": calls,
            "redis_cpu_seconds": ours.redis_cpu,
            "reference_redis_cpu_seconds": ref.redis_cpu,
        }
        self.record(
            "round_trips",
            f"{per_turn:.2f} (read events/turn; scripts/turn {scripts:.2f}; commands/turn "
            f"incl. inside Lua: {listed}; Redis CPU/turn {ours.redis_cpu / turns * 1e6:.0f} us; "
            f"non-200: {failed})",
            per_turn <= 2.0 + 0.05 and failed == 0,
        )
        row = self.rows["round_trips"]
        row.reference = (
            f"{ref.reads / turns:.2f}; Redis CPU/turn {ref.redis_cpu / turns * 1e6:.0f} us"
        )
        row.ratio = f"Redis CPU {_ratio(ours.redis_cpu, ref.redis_cpu)}"
        # Every figure compares arrays of the reference's size: a service that forwarded fewer
        # messages (a correction factor run away) would flatter them all.
        short = [n for n in forwarded if n != WINDOW_MESSAGES + 1]
        if short:
            self.failures.append(
                f"round_trips: {len(short)} of {len(forwarded)} turns forwarded other than "
                f"{WINDOW_MESSAGES + 1} messages (e.g. {short[0]})"
            )

    def sequential_turns(self, port: int, turns: int, forwarded: list[int] | None) -> Sequential:
        """`turns` turns one after another on one connection (conversations t1..t<turns>, after
        one that opens the connection), with what Redis did meanwhile. The service's forwarded
        array sizes go to `forwarded`."""
        assert self.redis is not None
        redis = self.redis
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = orjson.dumps({"model": MODEL, "message": {"role": "user", "content": USER_TEXT}})
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}

        def post(n: int) -> int:
            conn.request("POST", f"/conversations/t{n}/messages", body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            if response.status == 200 and forwarded is not None and n > 0:
                forwarded.append(orjson.loads(answer)["conversation"]["context"]["messages"])
            return response.status

        def redis_cpu() -> float:
            cpu = redis.info("cpu")
            return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

        post(0)  # the connection is open, the pool warm
        cpu0 = redis_cpu()
        stats0 = redis.info("stats")
        cmds0 = redis.info("commandstats")
        statuses = [post(n) for n in range(1, turns + 1)]
        stats1 = redis.info("stats")
        cmds1 = redis.info("commandstats")
        cpu1 = redis_cpu()
        conn.close()
        own = 2  # this bench's INFO commandstats and second INFO stats between the snapshots
        reads = int(stats1["total_reads_processed"]) - int(stats0["total_reads_processed"]) - own
        calls = {
            name.removeprefix("cmdstat_"): (
                int(cmds1[name]["calls"]) - int(cmds0.get(name, {"calls": 0})["calls"])
            )
            for name in cmds1
            if name != "cmdstat_info"
        }
        return Sequential(statuses, reads, {k: v for k, v in calls.items() if v}, cpu1 - cpu0)

    def history(self, port: int) -> None:
        print(f"history independence: {HISTORY_SMALL} vs {HISTORY_LARGE:,} stored, 1 connection")
        # Its own model name: the short arrays would otherwise move the main model's correction.
        small = self.script("history-small", "s", 2000, model=f"{MODEL}-short")
        large = self.script("history-large", "l", 4)
        figures = self.interleaved(
            {
                "small": lambda: self.wrk(port, small, 1, self.args.short),
                "large": lambda: self.wrk(port, large, 1, self.args.short),
            },
            max(2, self.args.rounds - 2),
        )
        self.raw["history"] = figures
        diff = figures["large"][0] - figures["small"][0]
        errors = figures["large"][2] + figures["small"][2]
        self.record(
            "history",
            f"{diff:+.3f} ms (p50 {figures['small'][0]:.3f} vs {figures['large'][0]:.3f} ms; "
            f"errors {errors})",
            diff <= 0.5 and errors == 0,
        )

    def throughput(self, port: int, key: str, script: Path, label: str) -> WrkResult:
        print(f"throughput, 32 connections: {label}", flush=True)
        self.wrk(port, script, 32, 2)  # warm-up
        result = self.wrk(port, script, 32, self.args.long)
        self.raw[key] = asdict(result) | {"per_second": result.ok_per_second}
        return result

    def in_flight(self) -> None:
        print(f"in flight: 500 connections, upstream answering after {SLOW_DELAY * 1000:g} ms")
        slow, slow_port = self.start_slow_upstream()
        script = self.script("inflight", "t", POOL)
        proc, port = self.start_service(slow_port, "service-slow")
        try:
            self.wrk(port, script, 500, 3)  # warm-up: opens the upstream connections
            result = self.wrk(port, script, 500, self.args.long)
        finally:
            self.stop(proc)
        # The reference on the same upstream: what a turn's CPU leaves of the ceiling. wrk's 500
        # connections start together, so the turns arrive in waves, each spending 500 x the CPU
        # per turn on the one core before its 500 ms wait: a CPU-bound figure, not the upstream's.
        ref, ref_port = self.start_reference(slow_port, "reference-slow", WINDOW_MESSAGES)
        try:
            ref_script = self.script("inflight-ref", "t", POOL)
            self.wrk(ref_port, ref_script, 500, 3)
            ref_result = self.wrk(ref_port, ref_script, 500, self.args.long)
        finally:
            self.stop(ref)
        # The ceiling: the slow upstream alone, same connections and length. 500 / 0.5 s is
        # 1,000/s, less the requests cut short at the end (about 950/s in 10 s).
        direct = self.direct_script("direct-slow", {"Authorization": UPSTREAM_KEY})
        self.wrk(slow_port, direct, 500, 2)
        alone = self.wrk(slow_port, direct, 500, self.args.long)
        self.stop(slow)
        self.raw["in_flight"] = asdict(result) | {"per_second": result.ok_per_second}
        self.raw["in_flight_reference"] = asdict(ref_result) | {
            "per_second": ref_result.ok_per_second
        }
        self.raw["in_flight_upstream_alone"] = asdict(alone) | {"per_second": alone.ok_per_second}
        self.record(
            "in_flight",
            f"{result.ok_per_second:,.0f} turns/s, p50 {result.p50_ms:.1f} / p99 "
            f"{result.p99_ms:.1f} ms, {result.detail}",
            result.errors == 0 and result.ok_per_second >= 0.95 * alone.ok_per_second,
        )
        ref_alone = _ratio(ref_result.ok_per_second, alone.ok_per_second)
        self.rows["in_flight"].reference = (
            f"the upstream alone: {alone.ok_per_second:,.0f}/s, p50 {alone.p50_ms:.1f} ms; the "
            f"reference: {ref_result.ok_per_second:,.0f}/s ({ref_alone} alone), "
            f"p50 {ref_result.p50_ms:.1f} ms, {ref_result.detail}"
        )
        self.rows["in_flight"].ratio = (
            f"{_ratio(result.ok_per_second, alone.ok_per_second)} alone; "
            f"{_ratio(result.ok_per_second, ref_result.ok_per_second)} ref"
        )

    def profile(self, port: int, pid: int) -> None:
        """py-spy on the service under the 32-connection load: an SVG and collapsed stacks."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            print("  py-spy is not installed: pip install py-spy")
            return
        script = self.script("profile", "t", POOL)
        RESULTS.mkdir(exist_ok=True)
        for fmt, out in (("flamegraph", "profile.svg"), ("raw", "profile.collapsed")):
            seconds = self.args.long
            argv = [spy, "record", "--pid", str(pid), "-d", str(int(seconds)), "-r", "250"]
            argv += ["--format", fmt, "-o", str(RESULTS / out), "--nonblocking"]
            spying = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = self.wrk(port, script, 32, seconds)
            spying.wait(30)
            print(f"  profile ({fmt}) under {result.ok_per_second:,.0f} turns/s -> results/{out}")

    def baseline(self) -> None:
        """LiteLLM's proxy on the same nginx upstream, core 0: latency and throughput."""
        print("LiteLLM proxy baseline", flush=True)
        try:
            proc, port = litellm.start(self.workdir, self.nginx_port)
        except Exception as exc:
            reason = str(exc).strip().splitlines()
            why = f"not run: {reason[0][:120] if reason else type(exc).__name__}"
            print(f"  LiteLLM {why}", file=sys.stderr)
            self.rows["latency"].litellm = self.rows["throughput"].litellm = why
            return
        self.procs.append(proc)
        self.target = proc
        self.rows["latency"].litellm = self.rows["throughput"].litellm = "failed"
        try:
            auth = {"Authorization": f"Bearer {litellm.MASTER_KEY}"}
            direct = self.direct_script("direct", {"Authorization": UPSTREAM_KEY})
            via = self.direct_script("litellm", auth)
            self.wrk(port, via, 32, 2)  # warm-up
            figures = self.interleaved(
                {
                    "direct": lambda: self.wrk(self.nginx_port, direct, 1, self.args.short),
                    "litellm": lambda: self.wrk(port, via, 1, self.args.short),
                },
                self.args.rounds,
            )
            d50, d99, _ = figures["direct"]
            l50, l99, lerr = figures["litellm"]
            self.raw["litellm_latency"] = figures
            self.rows["latency"].litellm = (
                f"+{l50 - d50:.3f} / +{l99 - d99:.3f} ms (through {l50:.3f} / {l99:.3f}; "
                f"errors {lerr})"
            )
            result = self.throughput(port, "litellm_throughput", via, "LiteLLM")
            self.rows["throughput"].litellm = (
                f"{result.ok_per_second:,.0f} req/s, p50 {result.p50_ms:.1f} / p99 "
                f"{result.p99_ms:.1f} ms, {result.detail}"
            )
        finally:
            self.stop(proc)

    def run(self) -> None:
        self.start_redis()
        self.start_nginx()
        self.phase("memory", self.seed_all)
        only = set(self.args.only.split(",")) if self.args.only else None
        phases: list[tuple[str, Callable[[], None]]] = [
            ("latency", self.latency),
            ("round_trips", lambda: self.round_trips(self.service())),
            ("history", lambda: self.history(self.service())),
            ("throughput", self.service_throughput),
            ("features", self.features),
            ("wide", self.wide),
            ("in_flight", self.in_flight),
        ]
        if not self.args.quick:
            phases.append(("summary_landed", self.long_conversation))
        for key, run in phases:
            if only is None or key in only:
                if key == "wide":  # the services on nginx are done with: core 0 for the wide pair
                    self.stop_main()
                self.phase(key, run)
        self.stop_main()
        if not self.args.no_litellm and not self.args.quick and only is None:
            self.baseline()

    def stop_main(self) -> None:
        for proc in (self.main, self.ref, self.floor):
            if proc is not None:
                self.stop(proc[0])
        self.main = self.ref = self.floor = None

    def long_conversation(self) -> None:
        """bench/long_conversation.py: 300 turns with summaries on, off, and plain trimming."""
        print("long conversation (summaries on, off, sliding trimming)", flush=True)
        got = long_conversation.measure(self.workdir, self.redis_port)
        on, off, sliding = got["on"], got["off"], got["sliding"]
        self.raw["long_conversation"] = {k: asdict(v) for k, v in got.items()}
        for name, figures in got.items():
            if figures.errors:
                raise RuntimeError(f"summaries {name}: {figures.errors[0]}")
        self.record(
            "summary_landed",
            f"{on.landed_share:.0%} of {on.moves} moves ({on.summary_calls} summaries, "
            f"{on.turns} turns; prefix held on {on.stable_share:.0%} of turns, summaries off "
            f"{off.stable_share:.0%}, sliding trimming {sliding.stable_share:.0%})",
            on.landed_share >= 0.95,
        )
        self.record(
            "summary_cached",
            f"{on.cached_share:.0%} (summaries off {off.cached_share:.0%}, sliding trimming "
            f"{sliding.cached_share:.0%})",
            on.cached_share >= 0.75,
        )
        self.rows["summary_landed"].litellm = self.rows["summary_cached"].litellm = "n/a"

    def service_throughput(self) -> None:
        print("throughput, 32 connections: the service, the reference and the floor, interleaved")
        port, ref_port = self.service(), self.reference()
        assert self.main is not None
        assert self.ref is not None
        floor_proc, floor_port = self.start_floor()
        script = self.script("throughput", "t", POOL)
        ref_script = self.script("throughput-ref", "t", POOL)
        got = self.loads(
            {
                "service": (self.main[0], port, script),
                "reference": (self.ref[0], ref_port, ref_script),
                "floor": (floor_proc, floor_port, ref_script),
            }
        )
        self.stop(floor_proc)
        self.floor = None
        service, ref, floor = got["service"], got["reference"], got["floor"]
        # 1.2x the reference's turns on one saturated core: at most its CPU per turn / 1.2, of
        # which the floor takes its share before any Redis work, validation or feature.
        left = ref.cpu_us / 1.2 - floor.cpu_us
        self.rows["floor"].service = (
            f"{floor.text()}; {floor.cpu_us:,.0f} us CPU/turn; beyond it the service spends "
            f"{service.cpu_us - floor.cpu_us:,.0f} us a turn; 1.2x the reference leaves "
            f"{left:,.0f} us"
        )
        self.rows["floor"].reference = f"beyond the floor: {ref.cpu_us - floor.cpu_us:,.0f} us"
        self.rows["floor"].ratio = f"{_ratio(floor.cpu_us, ref.cpu_us)} ref CPU"
        self.record(
            "throughput",
            f"{service.text()}",
            service.per_second >= 1.2 * ref.per_second and service.errors == 0,
        )
        self.rows["throughput"].reference = ref.text()
        self.rows["throughput"].ratio = _ratio(service.per_second, ref.per_second)
        self.record("cpu", f"{service.cpu_us:,.0f} us", service.cpu_us <= ref.cpu_us)
        self.rows["cpu"].reference = f"{ref.cpu_us:,.0f} us"
        self.rows["cpu"].ratio = _ratio(service.cpu_us, ref.cpu_us)
        if self.args.profile:
            self.profile(port, self.main[0].pid)

    def features(self) -> None:
        """An ordinary turn with a Claude model and summaries on, against one without, on the
        same service: same-shaped conversations with their own (unreached) budget."""
        print("features on (Claude model, summaries on) against off, interleaved")
        port = self.service()
        assert self.main is not None
        off = self.script("features-off", "f", POOL)
        on = self.script("features-on", "g", POOL, model=CLAUDE_MODEL)
        got = self.loads({"off": (self.main[0], port, off), "on": (self.main[0], port, on)})
        jobs = _metric_total(port, "convproxy_summary_jobs_total")
        self.record(
            "features",
            f"{got['on'].text()}; {got['on'].cpu_us:,.0f} us CPU/turn; summary jobs {jobs:g}",
            got["on"].per_second >= 0.95 * got["off"].per_second and got["on"].errors == 0,
        )
        self.rows[
            "features"
        ].reference = f"features off: {got['off'].text()}; {got['off'].cpu_us:,.0f} us CPU/turn"
        self.rows["features"].ratio = (
            f"{_ratio(got['on'].per_second, got['off'].per_second)} (CPU "
            f"{_ratio(got['on'].cpu_us, got['off'].cpu_us)})"
        )

    def wide(self) -> None:
        """200-message windows: a service and a reference of their own, on nginx's wide path
        (its usage matches a 200-message array, so the correction stays at 1), and a service of
        21-message windows interleaved with them: the target's base, measured in the same rounds,
        since this machine's speed drifts between phases (by a third, seen in one run)."""
        print("throughput, 32 connections: 200-message windows, service and reference")
        budget = token_budget(WIDE_WINDOW_MESSAGES)
        proc, port = self.start_service(
            self.nginx_port, "service-wide", base=WIDE_PATH, budget=budget
        )
        narrow, narrow_port = self.start_service(self.nginx_port, "service-21")
        ref, ref_port = self.start_reference(
            self.nginx_port, "reference-wide", WIDE_WINDOW_MESSAGES, base=WIDE_PATH
        )
        try:
            script = self.script("wide", "w", WIDE_POOL)
            ref_script = self.script("wide-ref", "w", WIDE_POOL)
            got = self.loads(
                {
                    "service": (proc, port, script),
                    "reference": (ref, ref_port, ref_script),
                    "narrow": (narrow, narrow_port, self.script("wide-base", "t", POOL)),
                }
            )
        finally:
            self.stop(proc)
            self.stop(narrow)
            self.stop(ref)
        service, reference_load, base = got["service"], got["reference"], got["narrow"]
        self.record(
            "wide",
            f"{service.text()}; {service.cpu_us:,.0f} us CPU/turn",
            service.per_second >= 0.5 * base.per_second and service.errors == 0,
        )
        self.rows["wide"].reference = (
            f"{reference_load.text()}; {reference_load.cpu_us:,.0f} us CPU/turn; 21-message "
            f"windows in the same rounds: {base.per_second:,.0f}/s, {base.cpu_us:,.0f} us CPU/turn"
        )
        self.rows["wide"].ratio = (
            f"{_ratio(service.per_second, base.per_second)} of 21-message; "
            f"{_ratio(service.per_second, reference_load.per_second)} ref"
        )

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


ORDER = (
    "latency",
    "openai",
    "throughput",
    "cpu",
    "floor",
    "wide",
    "features",
    "history",
    "in_flight",
    "round_trips",
    "memory",
    "summary_landed",
    "summary_cached",
)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def _has_path(port: int, path: str) -> bool:
    """Whether the service's OpenAPI document lists `path`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/openapi.json")
        return path in orjson.loads(conn.getresponse().read()).get("paths", {})
    finally:
        conn.close()


def _metric_total(port: int, name: str) -> float:
    """The sum of a metric's samples in the service's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def table(rows: dict[str, Row], info: dict[str, str]) -> str:
    head = (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['kernel']}, {info['python']}; "
        f"pinned: {info['taskset']} (service and reference on core {SERVICE_CORE}; wrk, nginx, "
        f"Redis on core {LOAD_CORE}); cores busy before start: {info.get('background', '?')}"
    )
    lines = [
        head,
        "",
        "| figure | target | service | ratio | ok | reference (same run) | LiteLLM proxy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in ORDER:
        row = rows.get(key)
        if row is None:
            continue
        ok = "yes" if row.passed else "no" if row.passed is not None else "?"
        if row.passed is None and row.service != "not measured":  # a figure with no target
            ok = "-"
        lines.append(
            f"| {row.figure} | {row.target} | {row.service} | {row.ratio} | {ok} | "
            f"{row.reference} | {row.litellm} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--short", type=float, default=2.0, help="seconds of each 1-conn run")
    parser.add_argument("--long", type=float, default=10.0, help="seconds of in-flight runs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per latency")
    parser.add_argument("--tp-seconds", type=float, default=5.0, help="seconds of a load round")
    parser.add_argument("--tp-rounds", type=int, default=3, help="interleaved load rounds")
    parser.add_argument("--only", default="", help="comma-separated figures, e.g. throughput")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs, no long conversation, no LiteLLM (about 2 minutes)",
    )
    parser.add_argument("--log-level", default="info", help="the service's LOG_LEVEL")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM baseline")
    parser.add_argument("--profile", action="store_true", help="py-spy the 32-connection load")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.short, args.long, args.rounds, args.tp_seconds, args.tp_rounds = 1, 5, 3, 3, 2

    info = machine()
    info["background"] = f"{busy_cores():.2f}"
    if float(info["background"]) > 0.2:
        print(f"warning: {info['background']} cores already busy: the figures will be low")
    missing = ensure_tools({"wrk": "wrk", "nginx": "nginx", "redis-server": "redis-server"})
    if missing:
        print(f"missing tools: run `sudo apt-get install -y {' '.join(missing)}` and retry")
        return 2
    raise_nofile()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    bench = Bench(args, workdir)
    failure = None
    try:
        bench.run()
    except Exception as exc:  # print what was measured, and why the rest was not
        failure = f"{type(exc).__name__}: {exc}"
        print(f"bench stopped early: {failure}", file=sys.stderr)
    finally:
        bench.close()
        if args.keep or failure or bench.failures:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = table(bench.rows, info)
    took = time.monotonic() - started
    print(f"\n{text}\n\n(bench took {took:.0f} s)")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"bench-{stamp}.md").write_text(text + "\n")
    record = {"machine": info, "rows": {k: r.__dict__ for k, r in bench.rows.items()}}
    (RESULTS / f"bench-{stamp}.json").write_bytes(
        orjson.dumps(record | {"raw": bench.raw, "failure": failure}, option=orjson.OPT_INDENT_2)
    )
    return 1 if failure or bench.failures else 0
