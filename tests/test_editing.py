"""Editing a conversation (issue 14): truncate, fork, export and import, regenerate, and edit and
resend, against real Redis and the stand-in gateway: what is answered, what the gateway was sent,
and what Redis holds afterwards, including the races."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from service.editing import idempotency
from service.history import message_hash
from service.idempotency import key_hash
from service.models import Message
from service.store import _meta
from service.summary_plan import fields_to_forget
from tests.conftest import make_settings, serve
from tests.fake_gateway import Failure, FakeGateway
from tests.polling import eventually
from tests.test_end_users import bearer, end_user_settings, token


def user(text: str) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}}


async def turns(client: httpx.AsyncClient, cid: str, *texts: str) -> None:
    for text in texts:
        response = await client.post(f"/conversations/{cid}/messages", json=user(text))
        assert response.status_code == 200, response.text


async def contents(client: httpx.AsyncClient, cid: str) -> list[str]:
    response = await client.get(f"/conversations/{cid}/messages", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return [m["content"] for m in response.json()["messages"]]


def meta_key(cid: str, tenant: str = "acme") -> str:
    return f"conv:{{{tenant}:{cid}}}:meta"


def lines(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in body.splitlines() if line.strip()]


# ---- truncate ------------------------------------------------------------------------------


async def test_truncate_removes_the_tail_and_cuts_every_list(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await turns(client, "t", "one", "two", "three")
    response = await client.delete("/conversations/t/messages", params={"from_seq": 3})
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "t", "message_count": 2, "generation": 1}
    assert await contents(client, "t") == ["one", "reply to: one"]
    assert await redis.llen("conv:{acme:t}:log") == 2
    assert await redis.llen("conv:{acme:t}:tok") == 2
    assert await redis.llen("conv:{acme:t}:hash") == 2
    # The next turn appends after the cut, at seq 3.
    await turns(client, "t", "four")
    page = (await client.get("/conversations/t/messages")).json()
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3, 4]
    assert page["messages"][2]["content"] == "four"
    sent = (await client.get("/conversations/t")).json()
    assert sent["message_count"] == 4


async def test_truncate_refuses_what_it_cannot_do(client: httpx.AsyncClient, redis: Redis) -> None:
    missing = await client.delete("/conversations/none/messages", params={"from_seq": 1})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    await turns(client, "r", "one")
    beyond = await client.delete("/conversations/r/messages", params={"from_seq": 3})
    assert beyond.status_code == 409
    assert beyond.json()["type"] == "/problems/seq-beyond-log"
    zero = await client.delete("/conversations/r/messages", params={"from_seq": 0})
    assert zero.status_code == 422
    assert await contents(client, "r") == ["one", "reply to: one"]
    assert await redis.hget(meta_key("r"), "generation") is None


async def test_truncate_everything_keeps_the_conversation(client: httpx.AsyncClient) -> None:
    await client.put("/conversations/all", json={"system": "terse"})
    await turns(client, "all", "one")
    response = await client.delete("/conversations/all/messages", params={"from_seq": 1})
    assert response.json()["message_count"] == 0
    conversation = (await client.get("/conversations/all")).json()
    assert conversation["message_count"] == 0
    assert conversation["system"] == "terse"


async def test_truncate_is_idempotent_with_a_key(client: httpx.AsyncClient) -> None:
    await turns(client, "i", "one", "two")
    headers = {"Idempotency-Key": "cut-1"}
    first = await client.delete(
        "/conversations/i/messages", params={"from_seq": 3}, headers=headers
    )
    again = await client.delete(
        "/conversations/i/messages", params={"from_seq": 3}, headers=headers
    )
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    other = await client.delete(
        "/conversations/i/messages", params={"from_seq": 1}, headers=headers
    )
    assert other.status_code == 422
    assert await contents(client, "i") == ["one", "reply to: one"]


async def test_truncate_forgets_what_it_cut_from_window_and_summaries(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await turns(client, "w", "one", "two", "three", "four")
    await redis.hset(
        meta_key("w"),
        mapping={
            "window_start": "5",
            "summary_text": "early",
            "summary_through": "2",
            "summary_version": "1",
            "summary_next_text": "later",
            "summary_next_through": "4",
            "summary_next_version": "2",
        },
    )
    await client.delete("/conversations/w/messages", params={"from_seq": 4})
    meta = await redis.hgetall(meta_key("w"))
    assert b"window_start" not in meta  # it was past the cut: the next turn chooses afresh
    assert meta[b"summary_text"] == b"early"  # covers 1-2, before the cut: kept
    assert b"summary_next_text" not in meta  # covered seq 4, which is gone
    await client.delete("/conversations/w/messages", params={"from_seq": 2})
    meta = await redis.hgetall(meta_key("w"))
    assert b"summary_text" not in meta
    assert meta[b"generation"] == b"2"


@pytest.mark.parametrize(
    ("current", "upcoming", "from_seq"),
    [(2, 4, 4), (2, 4, 2), (2, 4, 5), (0, 4, 3), (3, 0, 3), (3, 0, 4), (0, 0, 1)],
)
async def test_the_scripts_forget_what_fields_to_forget_says(
    client: httpx.AsyncClient, redis: Redis, current: int, upcoming: int, from_seq: int
) -> None:
    """The rewrite script clears exactly the summary fields summary_plan.fields_to_forget names."""
    await turns(client, "f", "one", "two", "three")
    fields: dict[Any, Any] = {}
    if current:
        fields |= {"summary_text": "a", "summary_through": str(current), "summary_version": "1"}
    if upcoming:
        fields |= {
            "summary_next_text": "b",
            "summary_next_through": str(upcoming),
            "summary_next_version": "2",
        }
    if fields:
        await redis.hset(meta_key("f"), mapping=fields)
    before = _meta(await redis.hgetall(meta_key("f")))
    expected = set(fields) - set(fields_to_forget(before, from_seq))
    response = await client.delete("/conversations/f/messages", params={"from_seq": from_seq})
    assert response.status_code == 200, response.text
    after = {k.decode() if isinstance(k, bytes) else k for k in await redis.hgetall(meta_key("f"))}
    assert {f for f in fields if f in after} == expected


# ---- paging across rewrites ----------------------------------------------------------------


async def test_an_old_cursor_gets_409_not_a_page_of_another_log(
    client: httpx.AsyncClient,
) -> None:
    await turns(client, "p", "one", "two", "three")
    newest = (await client.get("/conversations/p/messages", params={"limit": 2})).json()
    assert newest["generation"] == 0
    cursor = {"before": newest["messages"][0]["seq"], "generation": newest["generation"]}
    older = await client.get("/conversations/p/messages", params={"limit": 2, **cursor})
    assert older.status_code == 200
    assert [m["seq"] for m in older.json()["messages"]] == [3, 4]
    await client.delete("/conversations/p/messages", params={"from_seq": 3})
    await turns(client, "p", "edited")
    stale = await client.get("/conversations/p/messages", params={"limit": 2, **cursor})
    assert stale.status_code == 409
    assert stale.json()["type"] == "/problems/log-rewritten"
    fresh = (await client.get("/conversations/p/messages", params={"limit": 2})).json()
    assert fresh["generation"] == 1
    assert [m["content"] for m in fresh["messages"]] == ["edited", "reply to: edited"]


# ---- fork ----------------------------------------------------------------------------------


async def test_fork_copies_the_prefix_and_the_settings(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await client.put(
        "/conversations/src",
        json={"system": "be brief", "metadata": {"k": 1}, "token_budget": 3000},
    )
    await turns(client, "src", "one", "two", "three")
    await redis.hset(
        meta_key("src"),
        mapping={"summary_text": "s", "summary_through": "2", "summary_version": "1"},
    )
    response = await client.post("/conversations/src/fork", json={"new_id": "b", "through_seq": 4})
    assert response.status_code == 201, response.text
    assert response.json() == {"id": "b", "message_count": 4, "generation": 0}
    assert await contents(client, "b") == ["one", "reply to: one", "two", "reply to: two"]
    forked = (await client.get("/conversations/b")).json()
    assert forked["system"] == "be brief"
    assert forked["metadata"] == {"k": 1}
    assert forked["token_budget"] == 3000
    assert forked["summary"]["covers_through"] == 2
    assert forked["usage"]["input_tokens"] == 0  # usage belongs to the turns that ran
    assert await redis.lrange("conv:{acme:b}:tok", 0, -1) == await redis.lrange(
        "conv:{acme:src}:tok", 0, 3
    )
    # A summary covering more than the copy is not carried; the source is untouched.
    short = await client.post("/conversations/src/fork", json={"new_id": "c", "through_seq": 1})
    assert short.status_code == 201
    assert (await client.get("/conversations/c")).json()["summary"]["covers_through"] == 0
    assert len(await contents(client, "src")) == 6
    # The fork lives on by itself.
    await turns(client, "b", "branch")
    assert (await contents(client, "b"))[-1] == "reply to: branch"
    assert len(await contents(client, "src")) == 6


async def test_fork_refuses_an_existing_id_and_a_seq_past_the_end(
    client: httpx.AsyncClient,
) -> None:
    await turns(client, "s", "one")
    await turns(client, "taken", "mine")
    exists = await client.post("/conversations/s/fork", json={"new_id": "taken"})
    assert exists.status_code == 409
    assert exists.json()["type"] == "/problems/conversation-exists"
    assert await contents(client, "taken") == ["mine", "reply to: mine"]
    beyond = await client.post("/conversations/s/fork", json={"new_id": "n", "through_seq": 5})
    assert beyond.status_code == 409
    bad = await client.post("/conversations/s/fork", json={"new_id": "-bad"})
    assert bad.status_code == 422
    missing = await client.post("/conversations/nope/fork", json={"new_id": "n"})
    assert missing.status_code == 404
    assert (await client.get("/conversations/n")).status_code == 404


async def test_two_forks_race_for_one_id(client: httpx.AsyncClient) -> None:
    await turns(client, "s", "one", "two")
    results = await asyncio.gather(
        *(
            client.post("/conversations/s/fork", json={"new_id": "same", "through_seq": n})
            for n in (2, 4)
        )
    )
    assert sorted(r.status_code for r in results) == [201, 409]
    winner = next(r for r in results if r.status_code == 201).json()
    assert len(await contents(client, "same")) == winner["message_count"]
    both = await asyncio.gather(
        *(client.post("/conversations/s/fork", json={"new_id": f"f{n}"}) for n in range(2))
    )
    assert [r.status_code for r in both] == [201, 201]
    assert await contents(client, "f0") == await contents(client, "f1")


async def test_fork_is_idempotent_with_a_key(client: httpx.AsyncClient) -> None:
    await turns(client, "s", "one")
    headers = {"Idempotency-Key": "fork-1"}
    first = await client.post("/conversations/s/fork", json={"new_id": "k"}, headers=headers)
    again = await client.post("/conversations/s/fork", json={"new_id": "k"}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()


def source_idem_key(cid: str, key: str) -> str:
    return f"conv:{{acme:{cid}}}:idem:{key_hash(key)}"


async def test_a_fork_key_is_scoped_by_the_source_not_the_new_id(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await turns(client, "e1", "one", "two")
    headers = {"Idempotency-Key": "fk1"}
    first = await client.post("/conversations/e1/fork", json={"new_id": "e1-fork"}, headers=headers)
    assert first.status_code == 201, first.text
    other = await client.post(
        "/conversations/e1/fork", json={"new_id": "e1-fork2"}, headers=headers
    )
    assert other.status_code == 422, other.text
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"].endswith("idempotency-key-reused")
    assert await redis.exists(meta_key("e1-fork2"), "conv:{acme:e1-fork2}:log") == 0
    assert (await client.get("/conversations/e1-fork2")).status_code == 404
    # The same request replays the first answer and copies nothing again.
    again = await client.post("/conversations/e1/fork", json={"new_id": "e1-fork"}, headers=headers)
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await contents(client, "e1-fork") == await contents(client, "e1")
    # A turn or a truncate of the source under the fork's key is another request too.
    turn = await client.post("/conversations/e1/messages", json=user("x"), headers=headers)
    cut = await client.delete("/conversations/e1/messages", params={"from_seq": 2}, headers=headers)
    assert (turn.status_code, cut.status_code) == (422, 422)
    assert len(await contents(client, "e1")) == 4
    # ... and a fork reusing a turn's key meets the turn's record.
    turned = {"Idempotency-Key": "t1"}
    ok = await client.post("/conversations/e1/messages", json=user("y"), headers=turned)
    assert ok.status_code == 200, ok.text
    fork = await client.post("/conversations/e1/fork", json={"new_id": "e1-f3"}, headers=turned)
    assert fork.status_code == 422, fork.text
    assert await redis.exists(meta_key("e1-f3")) == 0


async def test_a_failed_fork_holds_no_key_and_delete_removes_the_claim(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await turns(client, "s", "one")
    await turns(client, "taken", "mine")
    headers = {"Idempotency-Key": "fk2"}
    for _ in range(2):  # the same request onto an existing id stays 409, never a replay
        taken = await client.post(
            "/conversations/s/fork", json={"new_id": "taken"}, headers=headers
        )
        assert taken.status_code == 409, taken.text
        assert await redis.exists(source_idem_key("s", "fk2")) == 0
    assert await contents(client, "taken") == ["mine", "reply to: mine"]
    missing = await client.post("/conversations/nope/fork", json={"new_id": "n"}, headers=headers)
    assert missing.status_code == 404
    assert await redis.exists(source_idem_key("nope", "fk2")) == 0
    # The key a failure gave back serves another request; that one holds it.
    free = await client.post("/conversations/s/fork", json={"new_id": "free"}, headers=headers)
    assert free.status_code == 201, free.text
    assert await redis.exists(source_idem_key("s", "fk2")) == 1
    assert (await client.delete("/conversations/s")).status_code == 204
    assert await redis.exists(source_idem_key("s", "fk2")) == 0


async def test_a_retry_after_a_crash_between_claim_and_copy_completes(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await turns(client, "s", "one")
    headers = {"Idempotency-Key": "fk3"}
    # What a replica that died after claiming the key on the source leaves behind.
    fingerprint = idempotency("fk3", "fork", "s", "late", None)
    assert fingerprint is not None
    await redis.set(source_idem_key("s", "fk3"), f"{fingerprint.fingerprint}\n{{}}")
    other = await client.post("/conversations/s/fork", json={"new_id": "x"}, headers=headers)
    assert other.status_code == 422
    retry = await client.post("/conversations/s/fork", json={"new_id": "late"}, headers=headers)
    assert retry.status_code == 201, retry.text
    assert await contents(client, "late") == await contents(client, "s")


async def test_fork_of_a_long_conversation_copies_every_page(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    """Over several pages (PAGE_SIZE): the copy is whole and in order."""
    records = [
        orjson.dumps(
            {
                "tokens": 3,
                "seq": i + 1,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"m{i + 1}",
                "created_at": 1.0,
            }
        )
        for i in range(1203)
    ]
    await client.put("/conversations/long", json={})
    await redis.rpush("conv:{acme:long}:log", *records)
    await redis.rpush("conv:{acme:long}:tok", *([3] * len(records)))
    response = await client.post("/conversations/long/fork", json={"new_id": "copy"})
    assert response.json()["message_count"] == 1203
    assert await redis.lrange("conv:{acme:copy}:log", 0, -1) == records
    assert await redis.llen("conv:{acme:copy}:tok") == 1203
    assert await redis.keys("conv:{acme:copy}:stage*") == []


# ---- export and import ---------------------------------------------------------------------


async def test_export_then_import_round_trips(client: httpx.AsyncClient, redis: Redis) -> None:
    await client.put("/conversations/e", json={"system": "sys", "metadata": {"a": [1]}})
    await turns(client, "e", "one", "two")
    exported = await client.get("/conversations/e/export")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("application/jsonl")
    parsed = lines(exported.content)
    assert parsed[0]["type"] == "conversation"
    assert parsed[0]["settings"]["system"] == "sys"
    assert parsed[0]["message_count"] == 4
    assert [m["seq"] for m in parsed[1:]] == [1, 2, 3, 4]
    assert parsed[2] == {**parsed[2], "role": "assistant", "content": "reply to: one"}
    imported = await client.post(
        "/conversations/e2/import",
        content=exported.content,
        headers={"Content-Type": "application/jsonl"},
    )
    assert imported.status_code == 201, imported.text
    assert imported.json() == {"id": "e2", "message_count": 4, "generation": 0}
    assert await contents(client, "e2") == await contents(client, "e")
    copy = (await client.get("/conversations/e2")).json()
    assert copy["system"] == "sys"
    assert copy["metadata"] == {"a": [1]}
    originals = (await client.get("/conversations/e/messages")).json()["messages"]
    copies = (await client.get("/conversations/e2/messages")).json()["messages"]
    assert [m["created_at"] for m in copies] == [m["created_at"] for m in originals]
    again = await client.post(
        "/conversations/e2/import",
        content=exported.content,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert again.status_code == 409
    assert await redis.llen("conv:{acme:e2}:tok") == 4


async def test_export_of_an_unknown_conversation_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/conversations/none/export")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


DEEP: dict[str, Any] = {}
_level = DEEP
for _ in range(40):
    _level["x"] = {}
    _level = _level["x"]


def export_file(*messages: dict[str, Any], **settings: Any) -> bytes:
    header = {"type": "conversation", "format": 1, "settings": settings}
    return b"\n".join(orjson.dumps(line) for line in [header, *messages]) + b"\n"


def message(seq: int, role: str = "user", content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"type": "message", "seq": seq, "role": role, "content": content, **extra}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "line 1"),
        (b"not json\n", "line 1: not JSON"),
        (export_file(message(1), message(3)), "line 3: seq"),
        (export_file(message(1), message(2, role="system")), "line 3"),
        (export_file(message(1), message(2, role="tool")), "tool_call_id"),
        (export_file(message(1), {"type": "message", "seq": 2}), "line 3"),
        (export_file(message(1, cache_control=DEEP)), "deeper"),
        (export_file(message(1), token_budget="many"), "line 1"),
        (export_file(message(1), api_key="x"), "line 1"),
        (b'{"type": "conversation", "format": 2, "settings": {}}\n', "line 1"),
    ],
)
async def test_import_refuses_a_bad_line_and_stores_nothing(
    client: httpx.AsyncClient, redis: Redis, body: bytes, needle: str
) -> None:
    response = await client.post(
        "/conversations/bad/import", content=body, headers={"Content-Type": "application/jsonl"}
    )
    assert response.status_code == 422, response.text
    assert needle in response.json()["detail"]
    assert await redis.keys("conv:{acme:bad}*") == []


async def test_import_is_size_and_count_limited(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with serve(make_settings(redis_url, max_body_bytes=2000), gateway) as http:
        big = export_file(*(message(i + 1, content="x" * 100) for i in range(30)))
        response = await http.post(
            "/conversations/big/import", content=big, headers={"Content-Type": "application/jsonl"}
        )
        assert response.status_code == 413
        assert await redis.keys("conv:{acme:big}*") == []


async def test_import_takes_a_summary_and_window_start_only_where_they_fit(
    client: httpx.AsyncClient,
) -> None:
    body = export_file(message(1), message(2, "assistant", "ok"), message(3))
    header = {
        "type": "conversation",
        "format": 1,
        "settings": {"summary": {"enabled": True}},
        "summary": {"text": "about hi", "covers_through": 2},
        "window_start": 3,
    }
    body = orjson.dumps(header) + b"\n" + body.split(b"\n", 1)[1]
    response = await client.post(
        "/conversations/sw/import", content=body, headers={"Content-Type": "application/jsonl"}
    )
    assert response.status_code == 201, response.text
    conversation = (await client.get("/conversations/sw")).json()
    assert conversation["summary"]["covers_through"] == 2
    assert conversation["summary"]["enabled"] is True
    assert conversation["window_start"] == 3
    header["summary"] = {"text": "too far", "covers_through": 9}
    header["window_start"] = 2  # an assistant message: not a turn's start
    body = orjson.dumps(header) + b"\n" + body.split(b"\n", 1)[1]
    response = await client.post(
        "/conversations/sw2/import", content=body, headers={"Content-Type": "application/jsonl"}
    )
    conversation = (await client.get("/conversations/sw2")).json()
    assert conversation["summary"]["covers_through"] == 0
    assert conversation["window_start"] == 1


# ---- regenerate ----------------------------------------------------------------------------


async def test_regenerate_replaces_the_last_reply(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await turns(client, "g", "one", "two")
    gateway.reply_prefix = "another answer to: "
    response = await client.post("/conversations/g/regenerate", json={"max_tokens": 50})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["conversation"]["message_count"] == 4
    assert body["choices"][0]["message"]["content"] == "another answer to: two"
    sent = gateway.received[-1]
    assert [m["content"] for m in sent["messages"]] == ["one", "reply to: one", "two"]
    assert sent["max_tokens"] == 50
    assert await contents(client, "g") == ["one", "reply to: one", "two", "another answer to: two"]
    assert await redis.llen("conv:{acme:g}:tok") == 4
    assert await redis.llen("conv:{acme:g}:hash") == 4
    assert await redis.hget(meta_key("g"), "generation") == b"1"


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "application/json"}])
async def test_regenerate_without_a_body_is_regenerate_with_an_empty_one(
    client: httpx.AsyncClient, gateway: FakeGateway, headers: dict[str, str]
) -> None:
    """Every field of a regenerate is optional: no body at all is `{}`, not a 422."""
    await turns(client, "nb", "one")
    gateway.reply_prefix = "again: "
    response = await client.post("/conversations/nb/regenerate", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["conversation"]["message_count"] == 2
    assert await contents(client, "nb") == ["one", "again: one"]
    # a turn's message stays required
    refused = await client.post("/conversations/nb/messages", headers=headers)
    assert refused.status_code == 422, refused.text
    assert await contents(client, "nb") == ["one", "again: one"]


async def test_regenerate_after_tool_calls_replaces_everything_after_the_user_message(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await turns(client, "tc", "weather?")
    calls = [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]
    response = await client.post(
        "/conversations/tc/messages",
        json={
            "messages": [
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ]
        },
    )
    assert response.status_code == 200
    regenerated = await client.post("/conversations/tc/regenerate", json={})
    assert regenerated.status_code == 200, regenerated.text
    assert await contents(client, "tc") == ["weather?", "reply to: weather?"]


async def test_a_failed_regenerate_changes_nothing(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await turns(client, "x", "one")
    before = await redis.lrange("conv:{acme:x}:log", 0, -1)
    gateway.failures.append(Failure(500, {"error": "down"}))
    gateway.failures.append(Failure(500, {"error": "down"}))
    gateway.failures.append(Failure(500, {"error": "down"}))
    response = await client.post("/conversations/x/regenerate", json={})
    assert response.status_code == 502
    assert await redis.lrange("conv:{acme:x}:log", 0, -1) == before
    assert await redis.hget(meta_key("x"), "generation") is None


async def test_regenerate_refuses_what_it_cannot_do(client: httpx.AsyncClient) -> None:
    missing = await client.post("/conversations/none/regenerate", json={})
    assert missing.status_code == 404
    await client.put("/conversations/empty", json={})
    empty = await client.post("/conversations/empty/regenerate", json={})
    assert empty.status_code == 409
    assert "no user message" in empty.json()["detail"]
    unknown = await client.post("/conversations/empty/regenerate", json={"api_base": "x"})
    assert unknown.status_code == 422
    message = await client.post("/conversations/empty/regenerate", json=user("x"))
    assert message.status_code == 422


async def test_regenerate_streams_and_replays(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await turns(client, "st", "one")
    gateway.reply_prefix = "streamed: "
    headers = {"Idempotency-Key": "regen-1"}
    streamed = await client.post(
        "/conversations/st/regenerate", json={"stream": True}, headers=headers
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert b"data: [DONE]" in streamed.content
    assert await contents(client, "st") == ["one", "streamed: one"]
    calls = gateway.calls
    replay = await client.post("/conversations/st/regenerate", json={}, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["conversation"]["message_count"] == 2
    assert gateway.calls == calls


async def test_a_regenerate_racing_a_turn_waits_and_answers_the_newest(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await turns(client, "race", "one")
    gateway.hold = asyncio.Event()
    turn = asyncio.create_task(client.post("/conversations/race/messages", json=user("two")))
    await eventually(lambda: gateway.calls == 2, what="the turn to reach the gateway")
    regenerate = asyncio.create_task(client.post("/conversations/race/regenerate", json={}))
    gateway.hold.set()
    assert (await turn).status_code == 200
    assert (await regenerate).status_code == 200
    assert await contents(client, "race") == ["one", "reply to: one", "two", "reply to: two"]
    assert [m["content"] for m in gateway.received[-1]["messages"]][-1] == "two"
    assert len(gateway.received) == 3


# ---- edit and resend -----------------------------------------------------------------------


async def test_edit_and_resend_replaces_from_a_user_message(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await turns(client, "ed", "one", "two", "three")
    response = await client.post(
        "/conversations/ed/messages", json={**user("TWO"), "replace_from": 3}
    )
    assert response.status_code == 200, response.text
    assert response.json()["conversation"]["message_count"] == 4
    assert [m["content"] for m in gateway.received[-1]["messages"]] == [
        "one",
        "reply to: one",
        "TWO",
    ]
    assert await contents(client, "ed") == ["one", "reply to: one", "TWO", "reply to: TWO"]
    seqs = [m["seq"] for m in (await client.get("/conversations/ed/messages")).json()["messages"]]
    assert seqs == [1, 2, 3, 4]  # the replacements take the seqs of what they replaced
    assert await redis.llen("conv:{acme:ed}:tok") == 4
    hashes = await redis.lrange("conv:{acme:ed}:hash", 0, -1)
    records = await redis.lrange("conv:{acme:ed}:log", 0, -1)
    # Each content hash (service/history.py) is the hash of the message now at its place.
    assert [h.decode() if isinstance(h, bytes) else h for h in hashes] == [
        message_hash(Message.from_json(r).to_wire()) for r in records
    ]


async def test_edit_and_resend_refuses_a_wrong_seq(client: httpx.AsyncClient) -> None:
    await turns(client, "ws", "one")
    role = await client.post("/conversations/ws/messages", json={**user("x"), "replace_from": 2})
    assert role.status_code == 422
    assert "not a user message" in role.json()["detail"]
    beyond = await client.post("/conversations/ws/messages", json={**user("x"), "replace_from": 3})
    assert beyond.status_code == 409
    tool_first = await client.post(
        "/conversations/ws/messages",
        json={
            "messages": [{"role": "tool", "tool_call_id": "c", "content": "x"}],
            "replace_from": 1,
        },
    )
    assert tool_first.status_code == 422
    missing = await client.post(
        "/conversations/none/messages", json={**user("x"), "replace_from": 1}
    )
    assert missing.status_code == 404
    assert (await client.get("/conversations/none")).status_code == 404
    assert await contents(client, "ws") == ["one", "reply to: one"]


async def test_an_edit_while_a_stream_runs_waits_for_it(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await turns(client, "es", "one")
    gateway.stream_gate = asyncio.Event()

    async def streamed() -> bytes:
        async with client.stream(
            "POST", "/conversations/es/messages", json={**user("two"), "stream": True}
        ) as response:
            return b"".join([chunk async for chunk in response.aiter_bytes()])

    stream = asyncio.create_task(streamed())
    await eventually(lambda: gateway.calls == 2, what="the stream to start")
    edit = asyncio.create_task(
        client.post("/conversations/es/messages", json={**user("ONE"), "replace_from": 1})
    )
    gateway.stream_gate.set()
    assert b"[DONE]" in await stream
    assert (await edit).status_code == 200
    assert await contents(client, "es") == ["ONE", "reply to: ONE"]


async def test_a_failed_edit_changes_nothing(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await turns(client, "fe", "one", "two")
    before = await redis.lrange("conv:{acme:fe}:log", 0, -1)
    gateway.failures.extend([Failure(400, {"error": {"message": "bad model"}})])
    response = await client.post(
        "/conversations/fe/messages", json={**user("x"), "replace_from": 1}
    )
    assert response.status_code == 400
    assert await redis.lrange("conv:{acme:fe}:log", 0, -1) == before


async def test_the_preview_shows_an_edit(client: httpx.AsyncClient) -> None:
    await turns(client, "pv", "one", "two")
    preview = await client.post("/conversations/pv/context", json={**user("X"), "replace_from": 3})
    assert preview.status_code == 200, preview.text
    assert [m["content"] for m in preview.json()["messages"]] == ["one", "reply to: one", "X"]
    wrong = await client.post("/conversations/pv/context", json={**user("X"), "replace_from": 2})
    assert wrong.status_code == 422


# ---- end-user tokens -----------------------------------------------------------------------


async def test_end_user_tokens_are_held_to_their_scope_on_every_route(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with serve(end_user_settings(redis_url), gateway, key=None) as http:
        writer = bearer(token())
        reader = bearer(token(scope="read"))
        for text in ("one", "two"):
            sent = await http.post(
                "/conversations/user-1-a/messages", json=user(text), headers=writer
            )
            assert sent.status_code == 200, sent.text
        # Reads need `read` only.
        assert (await http.get("/conversations/user-1-a/export", headers=reader)).status_code == 200
        # Every edit is a write.
        writes: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/conversations/user-1-a/regenerate", {"json": {}}),
            ("POST", "/conversations/user-1-a/fork", {"json": {"new_id": "user-1-b"}}),
            ("DELETE", "/conversations/user-1-a/messages", {"params": {"from_seq": 3}}),
            (
                "POST",
                "/conversations/user-1-c/import",
                {
                    "content": export_file(message(1)),
                    "headers": {"Content-Type": "application/jsonl"},
                },
            ),
            (
                "POST",
                "/conversations/user-1-a/messages",
                {"json": {**user("x"), "replace_from": 1}},
            ),
        ]
        for method, path, kwargs in writes:
            headers = {**reader, **kwargs.pop("headers", {})}
            refused = await http.request(method, path, headers=headers, **kwargs)
            assert refused.status_code == 403, (path, refused.text)
        assert len(await redis.lrange("conv:{acme:user-1-a}:log", 0, -1)) == 4
        assert await redis.keys("conv:{acme:user-1-[bc]}*") == []
        # A fork writes new_id: the token must cover it too.
        outside = await http.post(
            "/conversations/user-1-a/fork", json={"new_id": "someone-else"}, headers=writer
        )
        assert outside.status_code == 403
        assert await redis.keys("conv:{acme:someone-else}*") == []
        inside = await http.post(
            "/conversations/user-1-a/fork", json={"new_id": "user-1-b"}, headers=writer
        )
        assert inside.status_code == 201
        listed = (await http.get("/conversations", headers=writer)).json()["conversations"]
        assert {c["id"] for c in listed} == {"user-1-a", "user-1-b"}
        # An import's settings are held to what an end user may set: metadata only.
        system = await http.post(
            "/conversations/user-1-c/import",
            content=export_file(message(1), system="be evil"),
            headers={**writer, "Content-Type": "application/jsonl"},
        )
        assert system.status_code == 403
        assert await redis.keys("conv:{acme:user-1-c}*") == []
        regenerated = await http.post("/conversations/user-1-a/regenerate", json={}, headers=writer)
        assert regenerated.status_code == 200
        assert "Authorization" not in gateway.received_headers[-1]
        assert gateway.received_headers[-1]["authorization"] != writer["Authorization"]


async def test_a_rewrite_makes_a_running_summary_job_stale(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    """A summary job that read messages a rewrite removes must not store its summary: the
    rewrite moves the compare-and-set base (summary_version) while the job holds its lease."""
    await turns(client, "sj", "one", "two")
    await redis.hset(meta_key("sj"), mapping={"summary_text": "s", "summary_through": "2"})
    await redis.hset(meta_key("sj"), "summary_version", "3")
    await redis.set("conv:{acme:sj}:sumlock", "a job", px=10_000)
    await client.delete("/conversations/sj/messages", params={"from_seq": 3})
    assert await redis.hget(meta_key("sj"), "summary_version") == b"4"
    assert await redis.hget(meta_key("sj"), "summary_text") == b"s"  # covers 1-2: kept
    await redis.delete("conv:{acme:sj}:sumlock")
    await client.delete("/conversations/sj/messages", params={"from_seq": 2})
    assert await redis.hget(meta_key("sj"), "summary_version") is None  # no job: just forgotten


async def test_a_detached_edit_runs_to_its_end(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await turns(client, "de", "one", "two")
    response = await client.post(
        "/conversations/de/messages",
        json={**user("TWO"), "replace_from": 3, "stream": True, "detach": True},
    )
    assert response.status_code == 200
    assert b"data: [DONE]" in response.content
    assert await contents(client, "de") == ["one", "reply to: one", "TWO", "reply to: TWO"]
