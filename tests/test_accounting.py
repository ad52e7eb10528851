"""Token accounting (issues 9.2, 15.1): every usage shape read in plain and streamed answers, the
cached parts kept apart, the correction fed the prompt's full size, one tenant's odd content
never shrinking another tenant's window; and the trimming seams issue 17 found unprotected."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from service.usage import Usage, read_usage
from tests.conftest import OTHER_KEY, make_settings, serve
from tests.fake_gateway import FakeGateway

WORDS = "lorem ipsum " * 12


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}, **extra}


def test_every_usage_shape_is_read() -> None:
    # Anthropic: input_tokens is the uncached part only.
    anthropic = read_usage(
        {
            "input_tokens": 10,
            "cache_read_input_tokens": 800,
            "cache_creation_input_tokens": 190,
            "output_tokens": 7,
        }
    )
    assert anthropic == Usage(uncached=10, cache_read=800, cache_write=190, output=7)
    assert anthropic.prompt == 1000
    # OpenAI: prompt_tokens is all of it, cached_tokens inside.
    openai = read_usage(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 800},
        }
    )
    assert openai == Usage(uncached=200, cache_read=800, cache_write=0, output=7)
    # Both at once (a proxy that adds one naming to the other): the larger reading of the size.
    both = read_usage({"prompt_tokens": 990, "input_tokens": 10, "cache_read_input_tokens": 990})
    assert (both.prompt, both.cache_read) == (1000, 990)
    # Nonsense is no usage, never an error.
    assert read_usage(None).prompt == 0
    assert read_usage({"input_tokens": -3, "output_tokens": True}) == Usage(0, 0, 0, 0)
    assert read_usage({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 50}}) == (
        Usage(uncached=0, cache_read=5, cache_write=0, output=0)
    )


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{wanted}}} not in /metrics")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shape", ["anthropic", "openai"])
async def test_cached_tokens_are_kept_apart_and_the_correction_sees_the_whole_prompt(
    redis_url: str, redis: Redis, gateway: FakeGateway, shape: str, stream: bool
) -> None:
    gateway.usage_shape = shape
    gateway.cached_share = 0.75
    gateway.written_share = 0.2 if shape == "anthropic" else 0.0
    # A metric label of its own (metrics are per process, and a run may repeat in one process).
    model = f"cache-{shape}-{stream}-{uuid.uuid4().hex[:8]}"
    async with serve(make_settings(redis_url, token_budget=2000), gateway) as http:
        for i in range(3):
            response = await http.post(
                "/conversations/c/messages",
                json=user(f"question {i} " + "words " * 60, model=model, stream=stream),
            )
            assert response.status_code == 200
            if stream:
                last = [line for line in response.text.splitlines() if '"conversation"' in line]
                context = orjson.loads(last[-1][5:])["conversation"]["context"]
            else:
                context = response.json()["conversation"]["context"]
            assert context["cache_read_input_tokens"] > 0
        usage = (await http.get("/conversations/c")).json()["usage"]
        metrics = (await http.get("/metrics")).text
    parts = (
        usage["uncached_input_tokens"],
        usage["cache_read_input_tokens"],
        usage["cache_creation_input_tokens"],
    )
    assert sum(parts) == usage["input_tokens"] > 0
    assert usage["cache_read_input_tokens"] >= 0.7 * usage["input_tokens"]
    assert (usage["cache_creation_input_tokens"] > 0) == (shape == "anthropic")
    # The correction learned from the full prompt: above 1 (the stand-in counts more than the
    # estimate), never sunk to the uncached quarter the usage reports as input_tokens.
    factor = float(await redis.hget("conv:{acme}:calibration", model) or 0)
    assert factor > 1.0
    ratio = _metric(metrics, "convproxy_prompt_cache_hit_ratio", model=model)
    assert ratio == pytest.approx(usage["cache_read_input_tokens"] / usage["input_tokens"])
    read = _metric(metrics, "convproxy_prompt_tokens_total", kind="cache_read", model=model)
    assert read == usage["cache_read_input_tokens"]


async def test_one_tenants_odd_turn_does_not_shrink_another_tenants_window(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    """A mixed workload: acme chats in plain words near its budget; beta sends one turn of 2,000
    `!`, which the stand-in counts as a tokenizer does (one token per symbol, four times the
    estimate). acme's window stays as it was; only beta's correction rises."""
    gateway.punctuation_tokens = True
    settings = make_settings(redis_url, token_budget=1500, trim_low_water=1.0)
    async with (
        serve(settings, gateway) as acme,
        serve(settings, gateway, key=OTHER_KEY) as beta,
    ):
        forwarded = []
        for i in range(20):
            response = await acme.post(
                "/conversations/chat/messages", json=user(f"{i} " + "lorem ipsum " * 12)
            )
            assert response.status_code == 200
            forwarded.append(len(gateway.received[-1]["messages"]))
        assert response.json()["conversation"]["context"]["dropped_messages"] > 0
        acme_factor = float(await redis.hget("conv:{acme}:calibration", "claude-sonnet-4-6") or 0)
        odd = await beta.post("/conversations/chat/messages", json=user("!" * 2000))
        assert odd.status_code == 200
        beta_factor = float(await redis.hget("conv:{beta}:calibration", "claude-sonnet-4-6") or 0)
        assert beta_factor > 2 * acme_factor
        after = []
        for i in range(3):
            response = await acme.post(
                "/conversations/chat/messages", json=user(f"{i} " + "lorem ipsum " * 12)
            )
            assert response.status_code == 200
            after.append(len(gateway.received[-1]["messages"]))
    assert min(after) >= forwarded[-1], (forwarded, after)
    assert float(await redis.hget("conv:{acme}:calibration", "claude-sonnet-4-6") or 0) == (
        pytest.approx(acme_factor, rel=0.05)
    )


async def test_tool_definitions_count_in_the_budget(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "does a thing " * 40,
                "parameters": {"type": "object", "properties": {}},
            },
        }
        for i in range(4)
    ]
    await client.put("/conversations/t", json={"token_budget": 1200})
    plain = await client.post("/conversations/t/messages", json=user("hello"))
    with_tools = await client.post("/conversations/t/messages", json=user("hello", tools=tools))
    assert plain.status_code == with_tools.status_code == 200
    plain_tokens = plain.json()["conversation"]["context"]["estimated_tokens"]
    tools_tokens = with_tools.json()["conversation"]["context"]["estimated_tokens"]
    assert tools_tokens > plain_tokens + len(orjson.dumps(tools)) // 4
    # Tools that alone pass the budget are refused before anything is forwarded.
    calls = gateway.calls
    big = await client.post("/conversations/t/messages", json=user("hi", tools=tools * 3))
    assert big.status_code == 413
    assert gateway.calls == calls


async def test_tool_results_pin_their_call_under_a_tight_budget(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    """Tool results continue the open turn: its user message and tool call go with them or the
    turn is refused (413). Were they treated as a new turn, the tool result would be forwarded
    alone, an orphan the gateway rejects."""
    await client.put(["/conversations/tp", "messages"][0], json={"token_budget": 1000})
    gateway.tool_calls = [
        {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}
    ]
    first = await client.post("/conversations/tp/messages", json=user("find " + "x " * 1000))
    assert first.status_code == 200
    gateway.tool_calls = None
    calls = gateway.calls
    result = {"role": "tool", "tool_call_id": "c1", "content": "found " + "y " * 600}
    answer = await client.post("/conversations/tp/messages", json={"message": result})
    assert answer.status_code == 413, answer.text
    assert gateway.calls == calls
    assert await redis.llen("conv:{acme:tp}:log") == 2
    # A result that fits goes with the call it answers, never alone.
    small = {"role": "tool", "tool_call_id": "c1", "content": "found"}
    answer = await client.post("/conversations/tp/messages", json={"message": small})
    assert answer.status_code == 200
    roles = [m["role"] for m in gateway.received[-1]["messages"]]
    assert roles == ["user", "assistant", "tool"]


async def test_a_log_without_its_token_list_is_read_and_migrated(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    """Conversations stored before the token list existed (or whose list a foreign script left
    out of step) are read as before; the list is rebuilt from the records."""
    for i in range(2):
        assert (
            await client.post("/conversations/m/messages", json=user(f"hi {i}"))
        ).status_code == 200
    await redis.delete("conv:{acme:m}:tok")
    await redis.rpush("conv:{acme:m}:log", b'{"broken')  # an unreadable record, too
    await redis.rpush(
        "conv:{acme:m}:log",
        orjson.dumps({"tokens": 9, "seq": 6, "role": "user", "content": "old", "created_at": 1.0}),
    )
    await redis.rpush(
        "conv:{acme:m}:log",
        orjson.dumps(
            {"seq": 7, "role": "assistant", "content": "x", "tokens": 5, "created_at": 1.0}
        ),
    )
    response = await client.post("/conversations/m/messages", json=user("again"))
    assert response.status_code == 200
    tokens = [int(t) for t in await redis.lrange("conv:{acme:m}:tok", 0, -1)]
    assert len(tokens) == await redis.llen("conv:{acme:m}:log") == 9
    assert tokens[4:7] == [0, 9, 5]  # field order is no contract; unreadable counts nothing
    assert await redis.ttl("conv:{acme:m}:tok") > 0


async def test_a_rise_one_replica_stored_is_not_undone_by_another(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    """Two replicas of one tenant, each with its own cached correction: one sees the gateway
    count four times the estimate and stores the rise; the other's next turn, computed from its
    older copy, must not write the old value back over it (it may only decay it, slowly)."""
    gateway.punctuation_tokens = True
    settings = make_settings(redis_url, token_budget=4000)
    async with serve(settings, gateway) as one, serve(settings, gateway) as two:
        for http in (one, two):  # both have read and cached the tenant's correction
            plain = await http.post("/conversations/a/messages", json=user("lorem ipsum " * 20))
            assert plain.status_code == 200
        usual = float(await redis.hget("conv:{acme}:calibration", "claude-sonnet-4-6") or 0)
        odd = await one.post("/conversations/b/messages", json=user("!" * 2000))
        assert odd.status_code == 200
        risen = float(await redis.hget("conv:{acme}:calibration", "claude-sonnet-4-6") or 0)
        assert risen > 2 * usual
        plain = await two.post("/conversations/a/messages", json=user("lorem ipsum " * 20))
        assert plain.status_code == 200
    after = float(await redis.hget("conv:{acme}:calibration", "claude-sonnet-4-6") or 0)
    assert after > 0.8 * risen, (usual, risen, after)


async def test_a_fresh_replicas_first_turn_forwards_the_whole_window(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    """A replica that has not read the tenant's corrections yet (just started) still reads enough
    history for the window the real correction allows: it reads the corrections in the same round
    trip, so the read is sized for the smallest correction, not for the prior (1.5), which would
    have left out turns that a correction of 1.0 lets the budget hold."""
    settings = make_settings(redis_url, token_budget=1500, trim_low_water=1.0)
    roomy = make_settings(redis_url, token_budget=8000)  # the history, untrimmed so far
    async with serve(roomy, gateway) as warm:
        for i in range(24):
            response = await warm.post(
                "/conversations/chat/messages", json=user(f"{i} " + "lorem ipsum " * 12)
            )
            assert response.status_code == 200
    # The gateway as it might count: exactly the estimate.
    await redis.hset("conv:{acme}:calibration", "claude-sonnet-4-6", "1.0")
    async with serve(settings, gateway) as fresh:
        response = await fresh.post(
            "/conversations/chat/messages", json=user("24 " + "lorem ipsum " * 12)
        )
        assert response.status_code == 200
    context = response.json()["conversation"]["context"]
    assert context["dropped_messages"] > 0  # the budget, not the history, bounds the window
    # A read sized by the prior holds at most 1500 / (0.8 x 1.5) = 1,250 estimated tokens.
    assert context["estimated_tokens"] > 1400, context
