"""TurnJournal: the Redis side of detached turns (issue 16). One small class owns the keys.

Per conversation (tenant T, id I) and detached turn (a 16-hex-digit id D), every key carries the
conversation's hash tag, so a Cluster keeps them in one slot:
  conv:{T:I}:turn           hash: the conversation's latest detached turn: id, state, idem, fp
  conv:{T:I}:turn:D:events  stream: the turn's SSE events, entry ids 0-1, 0-2, ... (the n in an
                            SSE `id: D-n`); field `d` the event's bytes, `e` set on the last one
  conv:{T:I}:turn:D:alive   exists while the replica running the turn is alive (lease, renewed)
  conv:{T:I}:turn:D:ctl     stream: a cancel request for the turn
  conv:{T:I}:turn:D:state   the turn's final state, once it ended
The events stream is bounded (MAXLEN) and every key expires: DETACHED_TTL_SECONDS after the turn
ended, or after the turn's time limit plus that if its replica died mid-turn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from redis.exceptions import RedisError

from service.errors import StoreUnavailable
from service.store import ConversationRef, RedisClient

T = TypeVar("T")
State = Literal["running", "done", "failed", "cancelled", "lost"]
STATES: tuple[State, ...] = ("running", "done", "failed", "cancelled", "lost")

# KEYS: pointer, events, alive, state   ARGV: turn id, entry id, data, final state, ttl seconds.
# The last event and the turn's final state in one step, so no reader sees the one without the
# other; the pointer is only touched if a later detached turn has not taken it over.
FINISH = r"""
redis.call('XADD', KEYS[2], ARGV[2], 'd', ARGV[3], 'e', '1')
redis.call('EXPIRE', KEYS[2], ARGV[5])
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5])
redis.call('DEL', KEYS[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class Pointer:
    """The conversation's latest detached turn, as its pointer hash says."""

    id: str
    state: State
    idem: str  # the Idempotency-Key's hash, or ""
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Entry:
    n: int
    data: bytes
    last: bool


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(reply: Any) -> list[Entry]:
    """XREAD's or XRANGE's entries as (n, data, last)."""
    out = []
    for entry_id, fields in reply:
        values = {_text(k): v for k, v in fields.items()}
        data = values.get("d", b"")
        out.append(
            Entry(
                n=int(_text(entry_id).partition("-")[2]),
                data=data if isinstance(data, bytes) else data.encode(),
                last="e" in values,
            )
        )
    return out


class TurnJournal:
    """All Redis I/O of detached turns; errors come out as StoreUnavailable."""

    def __init__(
        self, redis: RedisClient, *, ttl_seconds: int, max_events: int, turn_seconds: float
    ) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._max_events = max_events
        # While a turn runs its keys outlive its time limit; once it ended, DETACHED_TTL_SECONDS.
        self._running_ttl = int(turn_seconds) + 1 + ttl_seconds

    @staticmethod
    def _key(ref: ConversationRef, turn_id: str, part: str) -> str:
        return ref.key(f"turn:{turn_id}:{part}")

    async def _call(self, run: Callable[[], Awaitable[T]]) -> T:
        try:
            return await run()
        except (ConnectionError, TimeoutError, OSError, RedisError) as exc:
            raise StoreUnavailable(
                f"Redis error ({type(exc).__name__})", headers={"Retry-After": "1"}
            ) from exc

    async def _pipeline(self, fill: Callable[[Any], None]) -> list[Any]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                fill(pipe)
                results: list[Any] = await pipe.execute()
            return results

        return await self._call(run)

    # ---- the replica running the turn ----------------------------------------------------------

    async def mark_alive(self, ref: ConversationRef, turn_id: str, lease_ms: int) -> None:
        """Say (again) that the turn's replica is alive, for one more lease."""
        key = self._key(ref, turn_id, "alive")
        await self._call(lambda: self._redis.set(key, b"1", px=lease_ms))

    async def begin(
        self, ref: ConversationRef, turn_id: str, *, idem: str, fingerprint: str, lease_ms: int
    ) -> None:
        """Make `turn_id` the conversation's latest detached turn, running, its replica alive
        (again: waiting for the conversation's lease may have taken longer than one)."""
        pointer = ref.key("turn")
        alive = self._key(ref, turn_id, "alive")

        def fill(pipe: Any) -> None:
            pipe.delete(pointer)
            pipe.hset(
                pointer,
                mapping={"id": turn_id, "state": "running", "idem": idem, "fp": fingerprint},
            )
            pipe.expire(pointer, self._running_ttl)
            pipe.set(alive, b"1", px=lease_ms)

        await self._pipeline(fill)

    async def append(self, ref: ConversationRef, turn_id: str, n: int, data: bytes) -> None:
        """One more event. MAXLEN bounds the stream: a reader that asks for a trimmed event is
        told so, never given a gap."""
        events = self._key(ref, turn_id, "events")

        def fill(pipe: Any) -> None:
            pipe.xadd(events, {"d": data}, id=f"0-{n}", maxlen=self._max_events, approximate=False)
            if n == 1:
                pipe.expire(events, self._running_ttl)

        await self._pipeline(fill)

    async def finish(
        self, ref: ConversationRef, turn_id: str, n: int, data: bytes, state: State
    ) -> None:
        keys = [
            ref.key("turn"),
            self._key(ref, turn_id, "events"),
            self._key(ref, turn_id, "alive"),
            self._key(ref, turn_id, "state"),
        ]
        args: list[str | bytes | int] = [turn_id, f"0-{n}", data, state, self._ttl]
        await self._call(lambda: self._redis.eval(FINISH, len(keys), *keys, *args))

    async def cancel_requested(self, ref: ConversationRef, turn_id: str, block_ms: int) -> bool:
        """Wait up to `block_ms` for a cancel request."""
        ctl = self._key(ref, turn_id, "ctl")
        reply = await self._call(lambda: self._redis.xread({ctl: "0-0"}, count=1, block=block_ms))
        return bool(reply)

    # ---- any replica ---------------------------------------------------------------------------

    async def request_cancel(self, ref: ConversationRef, turn_id: str) -> None:
        ctl = self._key(ref, turn_id, "ctl")

        def fill(pipe: Any) -> None:
            pipe.xadd(ctl, {"cancel": b"1"})
            pipe.expire(ctl, self._ttl)

        await self._pipeline(fill)

    async def pointer(self, ref: ConversationRef) -> Pointer | None:
        """The latest detached turn; a running one whose replica is gone says `lost`."""
        raw = await self._call(lambda: self._redis.hgetall(ref.key("turn")))
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if "id" not in fields or fields.get("state") not in STATES:
            return None
        state: State = fields["state"]  # type: ignore[assignment]  # checked against STATES
        if state == "running" and not await self.alive(ref, fields["id"]):
            state = "lost"
        return Pointer(fields["id"], state, fields.get("idem", ""), fields.get("fp", ""))

    async def state_of(self, ref: ConversationRef, turn_id: str) -> State:
        """One turn's state: final once it ended; `lost` if its replica died before."""
        state_key, alive = self._key(ref, turn_id, "state"), self._key(ref, turn_id, "alive")

        def fill(pipe: Any) -> None:
            pipe.get(state_key)
            pipe.exists(alive)

        final, running = await self._pipeline(fill)
        if final is not None and _text(final) in STATES:
            return _text(final)  # type: ignore[return-value]  # checked against STATES
        return "running" if running else "lost"

    async def lease_held(self, ref: ConversationRef) -> bool:
        """Whether any turn (detached or not) holds the conversation now."""
        return bool(await self._call(lambda: self._redis.exists(ref.key("lock"))))

    async def alive(self, ref: ConversationRef, turn_id: str) -> bool:
        key = self._key(ref, turn_id, "alive")
        return bool(await self._call(lambda: self._redis.exists(key)))

    async def known(self, ref: ConversationRef, turn_id: str) -> bool:
        """Whether anything of the turn is left to read or wait for."""
        events, alive = self._key(ref, turn_id, "events"), self._key(ref, turn_id, "alive")
        return bool(await self._call(lambda: self._redis.exists(events, alive)))

    async def read(
        self, ref: ConversationRef, turn_id: str, *, after: int, block_ms: int | None
    ) -> list[Entry]:
        """Events after the n-th, waiting up to `block_ms` for one (None: no wait)."""
        events = self._key(ref, turn_id, "events")
        reply: Any = await self._call(
            lambda: self._redis.xread({events: f"0-{after}"}, count=500, block=block_ms)
        )
        if not reply:
            return []
        return _entries(reply[0][1])  # RESP2: [[key, entries]]
