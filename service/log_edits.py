"""LogEditStore: the Redis side of editing a conversation's log (truncate, fork, export, import)
and of paging it by generation. Each method is one script, run through ConversationStore (which
loads them, reloads them after a restart and translates Redis errors).

A conversation written from elsewhere (a fork's copy, an import) is first staged under the new
conversation's own hash tag, in keys that expire by themselves, and then made the conversation in
one script that also checks it does not exist yet: nothing partial is ever visible, on a single
node or on a Cluster, where the source and the new conversation may live in different slots.
  conv:{T:I}:stage:<token>:log, conv:{T:I}:stage:<token>:tok   a copy being written
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from service.idempotency import Idempotency
from service.ids import random_id
from service.models import ConversationMeta, Message
from service.redis_scripts import _REWRITE, _SLIDE_TTL, _TOUCH_INDEX
from service.store import ConversationRef, ConversationStore, Waiting, _meta, _readable

STAGE_TTL_MS = 120_000  # a copy nobody finished (its replica died) is gone after this
PAGE_SIZE = 500  # messages per round trip when copying or exporting

# KEYS: meta, log   ARGV: limit, before (0: the newest), generation (-1: not checked).
# Answers {'gone'} | {'rewritten', generation} | {'ok', generation, length, first index, items}.
PAGE = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local asked = tonumber(ARGV[3])
if asked >= 0 and asked ~= generation then return {'rewritten', generation} end
local length = redis.call('LLEN', KEYS[2])
local before = tonumber(ARGV[2])
local stop = length
if before > 0 then stop = math.min(length, before - 1) end
local first = math.max(0, stop - tonumber(ARGV[1]))
local items = {}
if stop > 0 then items = redis.call('LRANGE', KEYS[2], first, stop - 1) end
return {'ok', generation, length, first, items}
"""

# KEYS: meta, log, tok   ARGV: first index, last index, generation (-1: the first read).
# A slice of the log with its token estimates, and on the first read the metadata too: the pages
# of one copy or export belong to one generation, else {'rewritten'}.
READ = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local asked = tonumber(ARGV[3])
if asked >= 0 and asked ~= generation then return {'rewritten'} end
local meta = {}
if asked < 0 then meta = redis.call('HGETALL', KEYS[1]) end
local length = redis.call('LLEN', KEYS[2])
-- A token list not rebuilt yet (service/redis_scripts.py): the caller estimates from records.
local tokens = {}
if redis.call('LLEN', KEYS[3]) == length then
  tokens = redis.call('LRANGE', KEYS[3], ARGV[1], ARGV[2])
end
local records = redis.call('LRANGE', KEYS[2], ARGV[1], ARGV[2])
return {'ok', generation, length, meta, records, tokens}
"""

# KEYS: stage log, stage tok   ARGV: ttl ms, count, then `count` records and `count` estimates.
STAGE = r"""
local count = tonumber(ARGV[2])
for first = 3, count + 2, 100 do
  local last = math.min(first + 99, count + 2)
  redis.call('RPUSH', KEYS[1], unpack(ARGV, first, last))
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first + count, last + count))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('LLEN', KEYS[1])
"""

# KEYS: meta, log, tok, lock, stage log, stage tok, idem, idem set, index (unused: the meta
# key), hash
# ARGV[1]: JSON {count, now, ttl, fields {k: v}, idem (bool), fingerprint, body, idem_ttl,
# index (bool), member, index_ttl}.
# Answers {'replay', body} | {'mismatch'} | {'exists'} | {'incomplete'} | {'ok', body}.
CREATE = (
    _SLIDE_TTL
    + _TOUCH_INDEX
    + r"""
local p = cjson.decode(ARGV[1])
local function drop_stage() redis.call('DEL', KEYS[5], KEYS[6]) end
if p.idem then
  local record = redis.call('GET', KEYS[7])
  if record then
    drop_stage()
    if string.sub(record, 1, 64) == p.fingerprint then return {'replay', string.sub(record, 66)} end
    return {'mismatch'}
  end
end
-- A first turn holding the lease is creating the conversation right now: it exists.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1
   or redis.call('EXISTS', KEYS[4]) == 1 then
  drop_stage()
  return {'exists'}
end
if p.count > 0 then
  if redis.call('LLEN', KEYS[5]) ~= p.count or redis.call('LLEN', KEYS[6]) ~= p.count then
    drop_stage()
    return {'incomplete'}
  end
  redis.call('RENAME', KEYS[5], KEYS[2])
  redis.call('RENAME', KEYS[6], KEYS[3])
end
-- Content hashes (service/history.py) are not copied: a turn that needs them lays the list anew
-- and computes them from the records.
redis.call('DEL', KEYS[10])
for field, value in pairs(p.fields) do redis.call('HSET', KEYS[1], field, value) end
redis.call('HSET', KEYS[1], 'created_at', p.now, 'updated_at', p.now)
slide_ttl(KEYS[1], {KEYS[2], KEYS[3]}, p.ttl)
if p.idem then
  redis.call('SET', KEYS[7], p.fingerprint .. '\n' .. p.body, 'EX', p.idem_ttl)
  redis.call('SADD', KEYS[8], KEYS[7])
  redis.call('EXPIRE', KEYS[8], p.idem_ttl)
end
if p.index then touch_index(KEYS[9], p.now, p.member, p.index_ttl) end
return {'ok', p.body}
"""
)

# KEYS: log, tok, meta, lock, sumlock, idem, idem set, index (unused: the meta key), hash
# ARGV[1]: JSON {from, now, ttl, idem (bool), fingerprint, idem_ttl, index (bool), member,
# index_ttl}.  Truncate: the log from seq `from` on is removed (rewrite_from), unless a turn
# holds the conversation. Answers {'busy', pttl} | {'replay', body} | {'mismatch'} | {'gone'}
# | {'beyond'} | {'ok', body}.
CUT = (
    _SLIDE_TTL
    + _TOUCH_INDEX
    + _REWRITE
    + r"""
local p = cjson.decode(ARGV[1])
if p.idem then
  local record = redis.call('GET', KEYS[6])
  if record then
    if string.sub(record, 1, 64) == p.fingerprint then return {'replay', string.sub(record, 66)} end
    return {'mismatch'}
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'busy', redis.call('PTTL', KEYS[4])} end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'gone'} end
local length = redis.call('LLEN', KEYS[1])
if p.from > length then return {'beyond'} end
if redis.call('LLEN', KEYS[2]) ~= length then redis.call('DEL', KEYS[2]) end
local generation = rewrite_from({KEYS[1], KEYS[2], KEYS[9]}, KEYS[3], KEYS[5], p.from)
redis.call('HSET', KEYS[3], 'updated_at', p.now)
slide_ttl(KEYS[3], {KEYS[1], KEYS[2], KEYS[9]}, p.ttl)
local body = '{"id":' .. cjson.encode(p.member) .. ',"message_count":' .. (p.from - 1)
             .. ',"generation":' .. generation .. '}'
if p.idem then
  redis.call('SET', KEYS[6], p.fingerprint .. '\n' .. body, 'EX', p.idem_ttl)
  redis.call('SADD', KEYS[7], KEYS[6])
  redis.call('EXPIRE', KEYS[7], p.idem_ttl)
end
if p.index then touch_index(KEYS[8], p.now, p.member, p.index_ttl) end
return {'ok', body}
"""
)


# KEYS: meta, idem, idem set   ARGV: fingerprint, record, idem_ttl.
# A fork's Idempotency-Key claimed on its SOURCE conversation (the route's conversation, which
# scopes the key), in the `fingerprint\n<body>` form of every other record: the create script
# keeps the fork's answer with the new conversation, another slot on a Cluster, so a second
# fork under the key with another new_id would not see it there. A turn or edit of the source
# reusing the key meets a foreign fingerprint (422) as it would meet any other record.
# Answers {'gone'} | {'mismatch'} | {'held'} (this request's, by an earlier call) | {'claimed'}.
CLAIM = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local record = redis.call('GET', KEYS[2])
if record then
  if string.sub(record, 1, 64) == ARGV[1] then return {'held'} end
  return {'mismatch'}
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {'claimed'}
"""

# KEYS: idem, idem set   ARGV: record. Removes a claim only while it is the one this call made.
RELEASE = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
return 1
"""

Claim = Literal["gone", "mismatch", "held", "claimed"]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[Message]
    has_more: bool
    generation: int


@dataclass(frozen=True, slots=True)
class Slice:
    """Records of the log as stored (JSON text) with their token estimates."""

    generation: int
    length: int
    meta: ConversationMeta | None  # on the first read only
    records: list[bytes]
    tokens: list[int]


@dataclass(frozen=True, slots=True)
class Created:
    body: bytes
    replayed: bool


Outcome = Literal["gone", "rewritten", "beyond", "exists", "mismatch", "incomplete"]


class LogEditStore:
    def __init__(
        self,
        store: ConversationStore,
        *,
        cluster: bool,
        conversation_ttl_seconds: int,
        idempotency_ttl_seconds: int,
        index_ttl_seconds: int,
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._ttl = conversation_ttl_seconds
        self._idem_ttl = idempotency_ttl_seconds
        self._index_ttl = index_ttl_seconds
        for name, source in (
            ("EDIT_PAGE", PAGE),
            ("EDIT_READ", READ),
            ("EDIT_STAGE", STAGE),
            ("EDIT_CREATE", CREATE),
            ("EDIT_CUT", CUT),
            ("EDIT_CLAIM", CLAIM),
            ("EDIT_RELEASE", RELEASE),
        ):
            store.register_script(name, source)

    def _index(self, ref: ConversationRef, unused: str) -> str:
        """The tenant index, passed to a script on a single node only (on a Cluster it lives in
        another slot and ConversationStore writes it beside)."""
        return unused if self._cluster else ref.index_key

    def _idem_fields(self, idempotency: Idempotency | None) -> dict[str, Any]:
        return {
            "idem": idempotency is not None,
            "fingerprint": idempotency.fingerprint if idempotency else "",
            "idem_ttl": self._idem_ttl,
            "index": not self._cluster,
            "index_ttl": self._index_ttl,
            "ttl": self._ttl,
        }

    async def page(
        self, ref: ConversationRef, *, limit: int, before: int | None, generation: int | None
    ) -> Page | Outcome:
        """Messages with seq < before (or the newest), oldest first, in one script with the
        log's generation, checked against `generation` when given."""
        answer = await self._store.run_script(
            "EDIT_PAGE",
            [ref.key("meta"), ref.key("log")],
            [limit, before or 0, -1 if generation is None else generation],
        )
        kind = _text(answer[0])
        if kind != "ok":
            return "gone" if kind == "gone" else "rewritten"
        first = int(answer[3])
        return Page(_readable(answer[4], ref), first > 0, int(answer[1]))

    async def read(
        self, ref: ConversationRef, first: int, last: int, *, generation: int | None
    ) -> Slice | Outcome:
        """Records first..last (0-based, inclusive); the first read (`generation` None) brings
        the metadata and fixes the generation the later ones must match."""
        answer = await self._store.run_script(
            "EDIT_READ",
            [ref.key("meta"), ref.key("log"), ref.key("tok")],
            [first, last, -1 if generation is None else generation],
        )
        kind = _text(answer[0])
        if kind != "ok":
            return "gone" if kind == "gone" else "rewritten"
        records = [r if isinstance(r, bytes) else r.encode() for r in answer[4]]
        tokens = [int(t) for t in answer[5]]
        if len(tokens) != len(records):  # a token list being rebuilt: estimate from the records
            tokens = [_record_tokens(r) for r in records]
        return Slice(
            generation=int(answer[1]),
            length=int(answer[2]),
            meta=_meta(answer[3]) if generation is None else None,
            records=records,
            tokens=tokens,
        )

    async def cut(
        self, ref: ConversationRef, from_seq: int, idempotency: Idempotency | None
    ) -> Waiting | Created | Outcome:
        """Truncate: remove seq `from_seq` and everything after it, unless a turn holds the
        conversation (Waiting)."""
        now = time.time()
        idem_key = ref.key(f"idem:{idempotency.key_hash}") if idempotency else ref.key("meta")
        keys = [
            ref.key("log"),
            ref.key("tok"),
            ref.key("meta"),
            ref.key("lock"),
            ref.key("sumlock"),
            idem_key,
            ref.key("idemkeys"),
            self._index(ref, ref.key("meta")),
            ref.key("hash"),
        ]
        argument = orjson.dumps(
            {
                "from": from_seq,
                "now": repr(now),
                "member": ref.id,
                **self._idem_fields(idempotency),
            }
        )
        answer = await self._store.run_script("EDIT_CUT", keys, [argument])
        kind = _text(answer[0])
        if kind == "busy":
            return Waiting(retry_in_ms=max(1, int(answer[1])), inflight=False)
        return await self._answered(ref, answer, now)

    async def create(
        self,
        ref: ConversationRef,
        *,
        pages: AsyncIterator[tuple[list[bytes], list[int]]],
        fields: dict[str, str],
        body: bytes,
        idempotency: Idempotency | None,
    ) -> Created | Outcome:
        """Create conversation `ref` with these records (and their token estimates, a page at a
        time) and metadata fields, all or nothing; `body` is the answer, kept for an idempotent
        replay."""
        token = random_id()
        stage_log, stage_tok = ref.key(f"stage:{token}:log"), ref.key(f"stage:{token}:tok")
        count = 0
        async for page_records, page_tokens in pages:
            if not page_records:
                continue
            count = int(
                await self._store.run_script(
                    "EDIT_STAGE",
                    [stage_log, stage_tok],
                    [STAGE_TTL_MS, len(page_records), *page_records, *page_tokens],
                )
            )
        now = time.time()
        idem_key = ref.key(f"idem:{idempotency.key_hash}") if idempotency else ref.key("meta")
        keys = [
            ref.key("meta"),
            ref.key("log"),
            ref.key("tok"),
            ref.key("lock"),
            stage_log,
            stage_tok,
            idem_key,
            ref.key("idemkeys"),
            self._index(ref, ref.key("meta")),
            ref.key("hash"),
        ]
        argument = orjson.dumps(
            {
                "count": count,
                "now": repr(now),
                "fields": fields,
                "body": body.decode(),
                "member": ref.id,
                **self._idem_fields(idempotency),
            }
        )
        answer = await self._store.run_script("EDIT_CREATE", keys, [argument])
        return await self._answered(ref, answer, now)

    async def _answered(self, ref: ConversationRef, answer: Any, now: float) -> Created | Outcome:
        """A rewriting script's answer: the stored (or replayed) body, else the outcome. On a
        Cluster the tenant's index lives in another slot, so a write touches it here."""
        kind = _text(answer[0])
        if kind not in ("ok", "replay"):
            return _outcome(kind)
        if kind == "ok" and self._cluster:
            await self._store.touch_index(ref, now)
        body = answer[1]
        return Created(body if isinstance(body, bytes) else body.encode(), kind == "replay")

    async def claim(self, ref: ConversationRef, idempotency: Idempotency, record: str) -> Claim:
        """Take `idempotency`'s key on `ref` (a fork's source) for `record`, unless it is
        there already: with this request's fingerprint ('held') or another's ('mismatch')."""
        answer = await self._store.run_script(
            "EDIT_CLAIM",
            [ref.key("meta"), ref.key(f"idem:{idempotency.key_hash}"), ref.key("idemkeys")],
            [idempotency.fingerprint, record, self._idem_ttl],
        )
        kind = _text(answer[0])
        claims: dict[str, Claim] = {"gone": "gone", "mismatch": "mismatch", "held": "held"}
        return claims.get(kind, "claimed")

    async def release(self, ref: ConversationRef, idempotency: Idempotency, record: str) -> None:
        """Give back a claim `claim` made with `record`, if it is still that one."""
        await self._store.run_script(
            "EDIT_RELEASE",
            [ref.key(f"idem:{idempotency.key_hash}"), ref.key("idemkeys")],
            [record],
        )


def _outcome(kind: str) -> Outcome:
    outcomes: dict[str, Outcome] = {
        "gone": "gone",
        "rewritten": "rewritten",
        "beyond": "beyond",
        "exists": "exists",
        "mismatch": "mismatch",
    }
    return outcomes.get(kind, "incomplete")


def _record_tokens(record: bytes) -> int:
    try:
        return Message.from_json(record).tokens
    except ValueError:
        return 0
