"""ConversationStore: the Redis key scheme, the Lua scripts, and (de)serialisation of records.

Per conversation (tenant T, id I), every key carries the hash tag `{T:I}`:
  conv:{T:I}:log        list of message JSON; a message's seq is its list index + 1
  conv:{T:I}:tok        list of each message's token estimate, at the same index as in `log`
                        (every script that writes `log` writes it too; a length that differs
                        from the log's makes the next turn rebuild it from the records)
  conv:{T:I}:hash       list of each message's content hash (service/history.py), at the same
                        index as in `log`; '' where unknown (stored before it existed). Every
                        script that appends to or rewrites `log` must cut or extend it in the
                        same place; a length that differs from the log's, or a `generation`
                        in meta other than its `hash_generation` (the log was rewritten since),
                        lays it anew as unknown
  conv:{T:I}:meta       hash: created_at, updated_at, system, model, token_budget, ttl_seconds,
                        metadata (JSON), usage totals (input_tokens, output_tokens,
                        uncached_input_tokens, cache_read_input_tokens,
                        cache_creation_input_tokens), window_start, trim_low_water, and
                        summary_* (the rolling summary and its settings: summary_store.py),
                        generation (bumped by every rewrite of the log: service/editing.py)
  conv:{T:I}:sumlock    the summary job's lease (service/summary_store.py)
  conv:{T:I}:lock       the turn lease: "<token>\\n<idempotency key hash>\\n<fingerprint>"
  conv:{T:I}:idem:<h>   a finished idempotent turn: "<fingerprint>\\n<response JSON>"
                        (both formats: service/idempotency.py)
  conv:{T:I}:idemkeys   set of the idem keys above, so DELETE can remove them
Per tenant: conv:{T}:index, a sorted set of conversation ids by last activity (epoch seconds),
expiring MAX_CONVERSATION_TTL_SECONDS after its last write; conv:{T}:user:<hash of sub>:index,
the same for what one end user wrote.
Per tenant: conv:{T}:calibration, a hash of token-estimate correction factors by model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from service import metrics, redis_scripts
from service.errors import StoreUnavailable
from service.idempotency import Idempotency, IdempotentRecord
from service.models import META, ConversationMeta, ConversationSummary, Message
from service.redis_batch import CommandBatcher
from service.tokens import PRIOR_FACTOR
from service.usage import Usage

log = logging.getLogger("service.store")
RedisClient = Redis | RedisCluster
_WINDOW: TypeAdapter[list[Message]] = TypeAdapter(list[Message])  # one parse for a whole window
# Other replicas' token-estimate corrections are read at most this often (with a turn's window).
FACTORS_REFRESH_SECONDS = 1.0
MAX_CACHED_TENANTS = 10_000  # corrections kept in memory; beyond, the oldest are forgotten
# Error replies that mean "not now" rather than "wrong": persistence failing, a replica promoted.
_TRANSIENT_REPLIES = ("MISCONF", "LOADING", "MASTERDOWN", "NOREPLICAS", "BUSY")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConversationRef:
    tenant: str
    id: str

    def key(self, part: str) -> str:
        return f"conv:{{{self.tenant}:{self.id}}}:{part}"

    @property
    def index_key(self) -> str:
        return f"conv:{{{self.tenant}}}:index"

    @property
    def calibration_key(self) -> str:
        return f"conv:{{{self.tenant}}}:calibration"


def user_index_key(tenant: str, sub: str) -> str:
    """One end user's conversations, beside the tenant's index; `sub` hashed (any characters)."""
    return f"conv:{{{tenant}}}:user:{hashlib.sha256(sub.encode()).hexdigest()[:32]}:index"


@dataclass(frozen=True, slots=True)
class Started:
    length: int  # the history a turn builds on: every stored message, or those before an edit
    meta: ConversationMeta | None
    window: list[Message]  # oldest first
    stored: int | None = None  # the log's whole length when a rewrite reads less (`length`)
    again: Message | None = None  # regenerate: the last user message, answered again
    # Asked for (`hashes=True`): every stored message's content hash, and the records of those
    # whose hash is unknown yet, by index (the turn computes them, and its commit stores them).
    hashes: list[str] | None = None
    unhashed: dict[int, Message] | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """A regenerate or an edit the log cannot take: `gone` (no conversation), `beyond` (no such
    seq), `role` (not a user message), `no_user` (nothing to regenerate)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Waiting:
    retry_in_ms: int
    inflight: bool  # held by the same idempotent request


@dataclass(frozen=True, slots=True)
class Replay:
    body: bytes


@dataclass(frozen=True, slots=True)
class Mismatch:
    pass


BeginResult = Started | Waiting | Replay | Mismatch | Refused


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _readable(items: Sequence[bytes | str], where: ConversationRef) -> list[Message]:
    """Stored messages, oldest first, parsed one by one: a record that does not read back (written
    before a limit existed, or damaged) is skipped, logged and counted, never a 500 forever."""
    messages = []
    for item in items:
        try:
            messages.append(Message.from_json(item))
        except ValidationError:
            _unreadable(where)
    return messages


def _window(items: list[bytes], where: ConversationRef) -> list[Message]:
    """The window, oldest first, in one parse; if a record does not read back, the window is what
    follows the newest unreadable record, so what is forwarded stays a coherent suffix."""
    try:
        return _WINDOW.validate_json(b"[" + b",".join(items) + b"]")
    except ValidationError:
        suffix: list[Message] = []
        for item in reversed(items):
            try:
                suffix.append(Message.from_json(item))
            except ValidationError:
                _unreadable(where)
                break
        suffix.reverse()
        return suffix


def _started(answer: Sequence[Any], ref: ConversationRef) -> Started:
    """BEGIN_TURN's {'ok', length, meta, suffix, stored, regenerated message[, hashes,
    unknown (index, record) pairs]}."""
    length, stored = int(answer[1]), int(answer[4])
    again = _readable([answer[5]], ref) if answer[5] else []
    hashes, unhashed = None, None
    if len(answer) > 6:
        pairs = answer[7]
        records = _readable(pairs[1::2], ref)
        hashes = [_text(h) for h in answer[6]]
        unhashed = {int(i): m for i, m in zip(pairs[::2], records, strict=False)}
    return Started(
        length=length,
        meta=_meta(answer[2]),
        window=_window(answer[3], ref),
        stored=stored if stored != length or again else None,
        again=again[0] if again else None,
        hashes=hashes,
        unhashed=unhashed,
    )


def _unreadable(where: ConversationRef) -> None:
    metrics.UNREADABLE_RECORDS.inc()
    log.error("unreadable stored message skipped", extra={"conversation_id": where.id})


def _meta(pairs: Sequence[bytes | str] | dict[Any, Any]) -> ConversationMeta | None:
    raw = (
        dict(pairs) if isinstance(pairs, dict) else dict(zip(pairs[::2], pairs[1::2], strict=True))
    )
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    if "metadata" in fields:
        fields["metadata"] = orjson.loads(fields["metadata"])
    fields.setdefault("created_at", fields.get("updated_at", "0"))
    fields.setdefault("updated_at", fields["created_at"])
    return META.validate_python(fields)


class _ClusterPipeline:
    """A cluster pipeline that accepts EVALSHA and EVAL. redis-py blocks `evalsha` on cluster
    pipelines because it cannot know a script is loaded on every node; ours are (SCRIPT LOAD goes
    to all primaries) and a NOSCRIPT reply reloads them, so the command is queued as is, routed by
    the slot of its keys like any other."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self._pipe.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def eval(self, source: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self._pipe.execute_command("EVAL", source, numkeys, *keys_and_args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class ConversationStore:
    """All Redis I/O. Each public method is one round trip (a script or a pipeline)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        cluster: bool,
        conversation_ttl_seconds: int,
        idempotency_ttl_seconds: int,
        index_ttl_seconds: int = 0,
        pool_size: int = 0,
        pool_timeout_seconds: float = 5.0,
    ) -> None:
        self._redis = redis
        self._cluster = cluster
        # redis-py's Cluster pools raise when a node's pool is full; one call uses at most one
        # connection per node, so at most `pool_size` calls at once never overfill one.
        self._gate = asyncio.Semaphore(pool_size) if cluster and pool_size else None
        # Scripts of concurrent turns share round trips (service/redis_batch.py).
        self._batcher = CommandBatcher(redis) if isinstance(redis, Redis) else None
        self._gate_timeout = pool_timeout_seconds
        self._ttl = conversation_ttl_seconds
        self._index_ttl = index_ttl_seconds
        self._idem_ttl = idempotency_ttl_seconds
        self._sources = {
            name: getattr(redis_scripts, name)
            for name in (
                "BEGIN_TURN",
                "COMMIT_TURN",
                "RENEW_LOCK",
                "RELEASE_LOCK",
                "UPSERT_META",
                "DELETE_CONVERSATION",
            )
        }
        self._sha: dict[str, str] = {}
        # tenant -> (monotonic time read, model -> correction factor)
        self._factors: dict[str, tuple[float, dict[str, float]]] = {}

    def register_script(self, name: str, source: str) -> None:
        """A script of another module (rate limits), loaded and reloaded with the store's own."""
        self._sources[name] = source

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._script(name, keys, args)

    async def load_scripts(self) -> None:
        """Loads every script (at start-up, and again when Redis lost them) and opens the
        batcher's connection, so that no turn pays for either."""
        for name, source in self._sources.items():
            self._sha[name] = _text(await self._redis.script_load(source))
        if self._batcher is not None:
            await self._batcher.connect()

    def known_factor(self, tenant: str, model: str) -> float | None:
        """The tenant's correction for `model` as last read; None before any was read here."""
        return self._factors.get(tenant, (0.0, {}))[1].get(model)

    def cached_factor(self, tenant: str, model: str) -> float:
        """The tenant's correction for `model` as last read; the prior before any observation."""
        known = self.known_factor(tenant, model)
        return PRIOR_FACTOR if known is None else known

    def _remember_factors(self, tenant: str, read_at: float, factors: dict[str, float]) -> None:
        if tenant not in self._factors and len(self._factors) >= MAX_CACHED_TENANTS:
            self._factors.pop(next(iter(self._factors)))
        self._factors[tenant] = (read_at, factors)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def aclose(self) -> None:
        """Closes the connection the batcher keeps; the client itself is its opener's."""
        if self._batcher is not None:
            await self._batcher.aclose()

    async def _call(self, run: Callable[[], Awaitable[T]]) -> T:
        """Run one round trip; reload scripts once if Redis lost them (restart, failover)."""
        if self._gate is None:
            return await self._round_trip(run)
        try:
            async with asyncio.timeout(self._gate_timeout):
                await self._gate.acquire()
        except TimeoutError as exc:
            raise StoreUnavailable(
                "every Redis connection stayed busy", headers={"Retry-After": "1"}
            ) from exc
        try:
            return await self._round_trip(run)
        finally:
            self._gate.release()

    async def _round_trip(self, run: Callable[[], Awaitable[T]]) -> T:
        try:
            try:
                return await run()
            except NoScriptError:
                await self.load_scripts()
                return await run()
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise StoreUnavailable("Redis is unreachable", headers={"Retry-After": "1"}) from exc
        except (ClusterDownError, TryAgainError, RedisClusterException) as exc:
            # A Cluster that cannot be reached, is failing over or is moving slots: transient.
            raise StoreUnavailable(
                f"Redis Cluster unavailable ({type(exc).__name__})", headers={"Retry-After": "1"}
            ) from exc
        except (ReadOnlyError, OutOfMemoryError) as exc:  # a failover under way, or Redis full
            raise StoreUnavailable(
                f"Redis cannot write now ({type(exc).__name__})", headers={"Retry-After": "1"}
            ) from exc
        except ResponseError as exc:
            if str(exc).startswith(_TRANSIENT_REPLIES):
                raise StoreUnavailable(
                    "Redis cannot serve now", headers={"Retry-After": "1"}
                ) from exc
            raise
        except RedisError as exc:
            raise StoreUnavailable(
                f"Redis error ({type(exc).__name__})", headers={"Retry-After": "1"}
            ) from exc

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async def run() -> Any:
            if name not in self._sha:
                await self.load_scripts()
            if self._batcher is None:  # a Cluster routes each script by its keys' slot
                return await self._redis.evalsha(self._sha[name], len(keys), *keys, *args)
            return await self._batcher.execute("EVALSHA", self._sha[name], len(keys), *keys, *args)

        return await self._call(run)

    async def _pipeline(self, fill: Callable[[Any], None]) -> list[Any]:
        async def run() -> list[Any]:
            if not self._sha:
                await self.load_scripts()
            async with self._redis.pipeline(transaction=False) as pipe:
                fill(_ClusterPipeline(pipe) if self._cluster else pipe)
                results: list[Any] = await pipe.execute(raise_on_error=False)
            for result in results:
                if isinstance(result, Exception):  # NoScriptError included: _call reloads
                    raise result
            return results

        return await self._call(run)

    # ---- turns -------------------------------------------------------------------------------

    async def begin_turn(
        self,
        ref: ConversationRef,
        *,
        lock_value: str,
        lease_ms: int,
        default_budget: int,
        budget_scale: float,
        max_messages: int,
        idempotency: Idempotency | None,
        replace_from: int | None = None,
        regenerate: bool = False,
        hashes: bool = False,
    ) -> BeginResult:
        """Take the lease and read the window's suffix in one round trip, with the tenant's
        token-estimate corrections when they are over a second old (and, with `hashes`, every
        stored message's content hash). With `replace_from` or `regenerate` the history ends
        before that seq (a user message) or before the last user message; Refused when there is
        none such."""
        keys = [ref.key("log"), ref.key("tok"), ref.key("meta"), ref.key("lock"), ref.key("hash")]
        if idempotency is not None:
            keys.append(ref.key(f"idem:{idempotency.key_hash}"))
        fields: dict[str, Any] = {
            "lock": lock_value,
            "lease_ms": lease_ms,
            "budget": default_budget,
            "scale": budget_scale,
            "max_messages": max_messages,
            "fingerprint": idempotency.fingerprint if idempotency else "",
            "key_hash": idempotency.key_hash if idempotency else "",
            "hashes": hashes,
        }
        if replace_from is not None:  # a JSON null would reach the script as cjson.null
            fields["from"] = replace_from
        if regenerate:
            fields["regenerate"] = True
        argument = orjson.dumps(fields)

        def fill(pipe: Any) -> None:
            pipe.evalsha(self._sha["BEGIN_TURN"], len(keys), *keys, argument)
            pipe.hgetall(ref.calibration_key)

        now = time.monotonic()
        read_at = self._factors.get(ref.tenant, (-FACTORS_REFRESH_SECONDS, {}))[0]
        if now - read_at >= FACTORS_REFRESH_SECONDS:
            answer, factors = await self._pipeline(fill)
            self._remember_factors(
                ref.tenant, now, {_text(k): float(v) for k, v in factors.items()}
            )
        else:  # the shared corrections are under a second old: the script alone
            answer = await self._script("BEGIN_TURN", keys, [argument])
        kind = _text(answer[0])
        if kind == "ok":
            return _started(answer, ref)
        if kind == "invalid":
            return Refused(_text(answer[1]))
        if kind == "replay":
            body = answer[1]
            return Replay(body=body if isinstance(body, bytes) else body.encode())
        if kind == "mismatch":
            return Mismatch()
        return Waiting(retry_in_ms=max(1, int(answer[1])), inflight=kind == "inflight")

    async def peek(
        self,
        ref: ConversationRef,
        *,
        default_budget: int,
        budget_scale: float,
        max_messages: int,
        replace_from: int | None = None,
        regenerate: bool = False,
    ) -> Started | Refused:
        """The window's suffix and metadata as a turn would read them, without its lease."""
        keys = [ref.key("log"), ref.key("tok"), ref.key("meta"), ref.key("lock"), ref.key("hash")]
        fields: dict[str, Any] = {
            "peek": True,
            "budget": default_budget,
            "scale": budget_scale,
            "max_messages": max_messages,
        }
        if replace_from is not None:
            fields["from"] = replace_from
        if regenerate:
            fields["regenerate"] = True
        answer = await self._script("BEGIN_TURN", keys, [orjson.dumps(fields)])
        if _text(answer[0]) == "invalid":
            return Refused(_text(answer[1]))
        return _started(answer, ref)

    async def commit_turn(
        self,
        ref: ConversationRef,
        *,
        lock_value: str,
        expected_length: int,
        messages: Sequence[Message],
        meta_updates: dict[str, str],
        usage: Usage,
        record: IdempotentRecord | None,
        model: str,
        factor: float | None,
        hashes: Sequence[str] = (),
        known_hashes: dict[int, str] | None = None,
        rewrite_from: int | None = None,
    ) -> Literal["ok", "lost", "conflict"]:
        """Append the turn, update metadata, usage totals, index and TTL, store the idempotent
        response and release the lease: atomically, and only if the lease is still ours
        (fencing). A changed correction `factor` for the tenant's `model` is written beside.
        With `rewrite_from`, the log is cut back to before that seq first (redis_scripts'
        rewrite_from: summaries, window start, generation), in the same script."""
        now = time.time()
        log = ref.key("log")
        idem_key = ref.key(f"idem:{record.idempotency.key_hash}") if record else log
        index_inline = not self._cluster
        keys = [
            log,
            ref.key("tok"),
            ref.key("meta"),
            ref.key("lock"),
            idem_key,
            ref.key("idemkeys") if record else log,
            ref.index_key if index_inline else log,
            ref.key("hash"),
            ref.key("sumlock"),
        ]
        rewrite = {} if rewrite_from is None else {"from": rewrite_from}
        argument = orjson.dumps(
            {
                **rewrite,
                "lock": lock_value,
                "expected": expected_length,
                "now": repr(now),
                "ttl": self._ttl,
                "idem": record is not None,
                "idem_record": record.encoded() if record else "",
                "idem_ttl": self._idem_ttl,
                "index": index_inline,
                "member": ref.id,
                "index_ttl": self._index_ttl,
                "usage": {
                    "input_tokens": usage.prompt,
                    "output_tokens": usage.output,
                    "uncached_input_tokens": usage.uncached,
                    "cache_read_input_tokens": usage.cache_read,
                    "cache_creation_input_tokens": usage.cache_write,
                },
                "tokens": [m.tokens for m in messages],
                # One per message ('' when the caller computed none: unknown until needed).
                "hashes": list(hashes) or [""] * len(messages),
                "known": sorted((known_hashes or {}).items()),
                "meta": meta_updates,
            }
        )
        records = [m.to_json() for m in messages]  # ARGV[2..], as stored
        calibration = ref.calibration_key
        known = self._factors.get(ref.tenant, (0.0, {}))[1]

        base = known.get(model)

        def fill(pipe: Any) -> None:
            pipe.evalsha(self._sha["COMMIT_TURN"], len(keys), *keys, argument, *records)
            # EVAL, not EVALSHA: a NOSCRIPT here (another node, on a Cluster) would retry the
            # whole pipeline, and with it a commit that already ran.
            pipe.eval(
                redis_scripts.SET_FACTOR,
                1,
                calibration,
                model,
                "" if base is None else repr(base),
                repr(factor),
                self._index_ttl,
            )

        if factor is not None and factor != base:
            answer, stored = await self._pipeline(fill)
            factor = float(stored)  # another replica's higher value may stand
        else:  # an unchanged correction needs no write: the script alone
            answer = await self._script("COMMIT_TURN", keys, [argument, *records])
        outcome = _text(answer[0])
        if outcome == "ok" and self._cluster:
            await self._touch_index(ref, now)
        if factor is not None:
            known[model] = factor
            if ref.tenant not in self._factors:
                self._remember_factors(ref.tenant, time.monotonic(), known)
        return "ok" if outcome == "ok" else "lost" if outcome == "lost" else "conflict"

    async def renew(self, ref: ConversationRef, lock_value: str, lease_ms: int) -> bool:
        return bool(await self._script("RENEW_LOCK", [ref.key("lock")], [lock_value, lease_ms]))

    async def release(self, ref: ConversationRef, lock_value: str) -> None:
        await self._script("RELEASE_LOCK", [ref.key("lock")], [lock_value])

    # ---- reads and settings ------------------------------------------------------------------

    async def summary(self, ref: ConversationRef) -> ConversationSummary | None:
        def fill(pipe: Any) -> None:
            pipe.hgetall(ref.key("meta"))
            pipe.llen(ref.key("log"))

        raw_meta, length = await self._pipeline(fill)
        meta = _meta(raw_meta)
        if meta is None:
            return None
        return ConversationSummary(id=ref.id, meta=meta, message_count=int(length))

    async def page(
        self, ref: ConversationRef, *, limit: int, before: int | None
    ) -> tuple[list[Message], bool] | None:
        """Messages with seq < before (or the newest), oldest first, and whether older exist.
        None: no such conversation."""

        def fill(pipe: Any) -> None:
            pipe.exists(ref.key("meta"))
            pipe.llen(ref.key("log"))

        exists, length = await self._pipeline(fill)
        if not exists:
            return None
        end = min(int(length), before - 1) if before is not None else int(length)
        start = max(0, end - limit)
        if end <= 0:
            return [], False
        items: list[Any] = await self._call(
            partial(self._redis.lrange, ref.key("log"), start, end - 1)
        )
        return _readable(items, ref), start > 0

    async def upsert(
        self, ref: ConversationRef, *, set_fields: dict[str, str], clear_fields: Sequence[str]
    ) -> bool:
        """Create or update settings; True when the conversation was created."""
        now = time.time()
        keys = [ref.key("meta"), ref.key("log"), ref.key("tok"), ref.key("hash")]
        index_inline = not self._cluster
        if index_inline:
            keys.append(ref.index_key)
        args: list[Any] = [repr(now), self._ttl, ref.id, self._index_ttl]
        for field, value in set_fields.items():
            args += ["set", field, value]
        for field in clear_fields:
            args += ["del", field, ""]
        created = bool(await self._script("UPSERT_META", keys, args))
        if not index_inline:
            await self._touch_index(ref, now)
        return created

    async def touch_index(self, ref: ConversationRef, now: float) -> None:
        """The tenant index beside a script's write, on a Cluster (see _touch_index)."""
        await self._touch_index(ref, now)

    async def _touch_index(self, ref: ConversationRef, now: float) -> None:
        """On a Cluster the tenant index lives in another slot, written after the conversation.
        It is a derived view: failing to write it is logged and counted, never the failure of
        what was already stored (a retry would store a turn twice)."""
        index, ttl = ref.index_key, self._index_ttl

        def fill(pipe: Any) -> None:
            pipe.zadd(index, {ref.id: now})
            if ttl > 0:
                pipe.zremrangebyscore(index, "-inf", f"({now - ttl!r}")
                pipe.expire(index, ttl)

        try:
            await self._pipeline(fill)
        except (StoreUnavailable, RedisError) as exc:
            metrics.INDEX_WRITE_FAILURES.inc()
            log.warning(
                "conversation index not updated",
                extra={"conversation_id": ref.id, "error": type(exc).__name__},
            )

    async def delete(self, ref: ConversationRef) -> Waiting | bool:
        """Delete everything of a conversation unless a turn holds it; True if it existed."""
        keys = [
            ref.key("log"),
            ref.key("meta"),
            ref.key("lock"),
            ref.key("idemkeys"),
            ref.key("tok"),
            ref.key("hash"),
        ]
        if not self._cluster:
            keys.append(ref.index_key)
        answer = await self._script("DELETE_CONVERSATION", keys, [ref.id])
        if _text(answer[0]) == "busy":
            return Waiting(retry_in_ms=max(1, int(answer[1])), inflight=False)
        if self._cluster:  # a stale entry left here is dropped by the next listing
            with contextlib.suppress(StoreUnavailable, RedisError):
                await self._call(lambda: self._redis.zrem(ref.index_key, ref.id))
        return bool(int(answer[1]))

    async def touch_user_index(self, ref: ConversationRef, sub: str) -> None:
        """Note an end user's write in their own index (a derived view, like the tenant's)."""
        index, now, ttl = user_index_key(ref.tenant, sub), time.time(), self._index_ttl

        def fill(pipe: Any) -> None:
            pipe.zadd(index, {ref.id: now})
            if ttl > 0:
                pipe.expire(index, ttl)

        try:
            await self._pipeline(fill)
        except (StoreUnavailable, RedisError) as exc:
            metrics.INDEX_WRITE_FAILURES.inc()
            log.warning("end user's index not updated", extra={"error": type(exc).__name__})

    async def list_conversations(
        self,
        tenant: str,
        *,
        limit: int,
        cursor: tuple[float, str] | None,
        sub: str | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> tuple[list[ConversationSummary], tuple[float, str] | None]:
        """Newest activity first; `cursor` is the (score, id) of the last item already seen.
        With `sub`, the end user's own index; `keep` leaves out ids the caller may not see."""
        index = user_index_key(tenant, sub) if sub else ConversationRef(tenant, "").index_key
        top: float | str = cursor[0] if cursor else "+inf"
        found: list[tuple[float, ConversationSummary]] = []
        offset, batch = 0, limit + 8
        while len(found) <= limit:
            rows: list[Any] = await self._call(
                partial(
                    self._redis.zrange,
                    index,
                    top,
                    "-inf",
                    byscore=True,
                    desc=True,
                    offset=offset,
                    num=batch,
                    withscores=True,
                )
            )
            # Equal scores come in descending id order: skip what the cursor already covered.
            fresh = [
                (float(score), _text(member))
                for member, score in rows
                if not (cursor and float(score) == cursor[0] and _text(member) >= cursor[1])
                and (keep is None or keep(_text(member)))
            ]
            summaries = await self._summaries(tenant, [cid for _, cid in fresh])
            gone = [
                cid for (_, cid), summary in zip(fresh, summaries, strict=True) if summary is None
            ]
            removed = 0
            if gone:  # expired or deleted: the index is a derived view, tidy it lazily
                removed = int(await self._call(partial(self._redis.zrem, index, *gone)))
            # What was removed sat before the next batch: the offset moves past what remains.
            offset += len(rows) - removed
            found += [
                (score, summary)
                for (score, _), summary in zip(fresh, summaries, strict=True)
                if summary is not None
            ]
            if len(rows) < batch:
                break
        page = found[:limit]
        next_cursor = (page[-1][0], page[-1][1].id) if len(found) > limit else None
        return [summary for _, summary in page], next_cursor

    async def _summaries(self, tenant: str, ids: Sequence[str]) -> list[ConversationSummary | None]:
        refs = [ConversationRef(tenant, cid) for cid in ids]

        def fill(pipe: Any) -> None:
            for ref in refs:
                pipe.hgetall(ref.key("meta"))
                pipe.llen(ref.key("log"))

        results = await self._pipeline(fill) if refs else []
        out: list[ConversationSummary | None] = []
        for i, ref in enumerate(refs):
            meta = _meta(results[2 * i])
            out.append(
                None
                if meta is None
                else ConversationSummary(
                    id=ref.id, meta=meta, message_count=int(results[2 * i + 1])
                )
            )
        return out
