"""`/v1/chat/completions` and `/v1/models` with the real openai SDK (issue 12): its async client
over ASGI, its sync client through a bridge to the same app, against real Redis and the stand-in
gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import openai
import orjson
import pytest
from asgi_lifespan import LifespanManager
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessageParam,
    ChatCompletionChunk,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
    ChatCompletionUserMessageParam,
)
from redis.asyncio import Redis

from service.app import create_app
from service.config import Settings
from tests.conftest import CLIENT_KEY, OTHER_KEY, make_settings, with_gateway
from tests.fake_gateway import Failure, FakeGateway, serve_in_process
from tests.test_streaming import serving

CONVERSATION = {"X-Conversation-Id": "chat-1"}


class BridgeTransport(httpx2.BaseTransport):
    """The sync SDK's requests, sent to the app on the test's event loop (from a worker thread).
    The answer is read whole before it is handed back: a stream arrives all at once."""

    def __init__(self, app: httpx2.AsyncBaseTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._app = app
        self._loop = loop

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        async def call() -> httpx2.Response:
            response = await self._app.handle_async_request(request)
            body = await response.aread()
            return httpx2.Response(response.status_code, headers=response.headers, content=body)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()


class LosingFirstAnswer(httpx2.AsyncBaseTransport):
    """Delivers every request, but loses the first answer on its way back: the client sees a
    broken connection after the service did the work, and retries."""

    def __init__(self, app: httpx2.AsyncBaseTransport) -> None:
        self._app = app
        self.attempts: list[httpx2.Headers] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.attempts.append(request.headers)
        response = await self._app.handle_async_request(request)
        await response.aread()
        if len(self.attempts) == 1:
            raise httpx2.ReadError("connection reset by peer", request=request)
        return response


@dataclass
class Stack:
    http: httpx.AsyncClient  # our own routes, with the client key
    app: httpx2.AsyncBaseTransport  # the same app, for the SDK's HTTP library
    sdk: openai.AsyncOpenAI

    def sync_sdk(self, **options: Any) -> openai.OpenAI:
        bridge = BridgeTransport(self.app, asyncio.get_running_loop())
        return openai.OpenAI(
            base_url="http://test/v1",
            api_key=CLIENT_KEY,
            http_client=httpx2.Client(transport=bridge, base_url="http://test"),
            **{"max_retries": 0, **options},
        )

    def async_sdk(
        self,
        transport: httpx2.AsyncBaseTransport | None = None,
        *,
        key: str = CLIENT_KEY,
        **options: Any,
    ) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://test/v1",
            api_key=key,
            http_client=httpx2.AsyncClient(transport=transport or self.app, base_url="http://test"),
            **{"max_retries": 0, **options},
        )


@asynccontextmanager
async def stack_for(settings: Settings, gateway: FakeGateway) -> AsyncIterator[Stack]:
    async with serve_in_process(gateway) as gateway_url:
        app = create_app(with_gateway(settings, gateway_url))
        async with LifespanManager(app) as manager:
            transport = httpx2.ASGITransport(app=manager.app)
            async with (
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=manager.app),
                    base_url="http://test",
                    headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                ) as http,
                httpx2.AsyncClient(transport=transport, base_url="http://test") as sdk_http,
            ):
                sdk = openai.AsyncOpenAI(
                    base_url="http://test/v1",
                    api_key=CLIENT_KEY,
                    http_client=sdk_http,
                    max_retries=0,
                )
                yield Stack(http=http, app=transport, sdk=sdk)


@pytest.fixture
async def stack(settings: Settings, gateway: FakeGateway) -> AsyncIterator[Stack]:
    async with stack_for(settings, gateway) as built:
        yield built


async def stored(stack: Stack, conversation_id: str = "chat-1") -> list[Any]:
    response = await stack.http.get(f"/conversations/{conversation_id}/messages")
    assert response.status_code == 200, response.text
    return [
        {k: v for k, v in m.items() if k not in ("seq", "created_at")}
        for m in response.json()["messages"]
    ]


def user(text: str) -> ChatCompletionUserMessageParam:
    return {"role": "user", "content": text}


def assistant(text: str) -> ChatCompletionAssistantMessageParam:
    return {"role": "assistant", "content": text}


def fully_populated(completion: ChatCompletion, content: str, model: str) -> None:
    assert isinstance(completion, ChatCompletion)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.created > 1_700_000_000
    assert completion.model == model
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == content
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_three_turns_newest_message_only_async(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    sent = ["Hello", "What is 2+2?", "And 3+3?"]
    counts = []
    for text in sent:
        raw = await stack.sdk.chat.completions.with_raw_response.create(
            model="m-one", messages=[user(text)], extra_headers=CONVERSATION
        )
        fully_populated(raw.parse(), f"reply to: {text}", "m-one")
        assert raw.headers["X-Conversation-Id"] == "chat-1"
        counts.append((raw.headers["X-Conversation-Messages"], raw.headers["X-Context-Messages"]))
        assert raw.headers["X-Context-Dropped"] == "0"
        assert int(raw.headers["X-Context-Tokens"]) > 0
    assert counts == [("2", "1"), ("4", "3"), ("6", "5")]
    history = [user("Hello"), assistant("reply to: Hello"), user("What is 2+2?")]
    history += [assistant("reply to: What is 2+2?"), user("And 3+3?")]
    # The stand-in received the whole history each time, though each call sent one message.
    assert [r["messages"] for r in gateway.received] == [history[:1], history[:3], history]
    assert await stored(stack) == [*history, assistant("reply to: And 3+3?")]
    assert gateway.received_headers[0]["authorization"] != f"Bearer {CLIENT_KEY}"


async def test_three_turns_with_the_sync_client_and_a_system_prompt(
    stack: Stack, gateway: FakeGateway
) -> None:
    sdk = stack.sync_sdk()
    system: ChatCompletionDeveloperMessageParam = {"role": "developer", "content": "Be terse."}
    metadata = {"conversation_id": "sync-1", "team": "qa"}

    def three_turns() -> list[ChatCompletion]:
        return [
            sdk.chat.completions.create(
                model="m-sync",
                messages=[system, user(text)] if n == 0 else [user(text)],
                metadata=metadata,
            )
            for n, text in enumerate(["one", "two", "three"])
        ]

    answers = await asyncio.to_thread(three_turns)
    for answer, text in zip(answers, ["one", "two", "three"], strict=True):
        fully_populated(answer, f"reply to: {text}", "m-sync")
    last = gateway.received[-1]["messages"]
    assert last[0] == {"role": "system", "content": "Be terse."}
    assert [m["content"] for m in last[1:]] == [
        "one",
        "reply to: one",
        "two",
        "reply to: two",
        "three",
    ]
    conversation = (await stack.http.get("/conversations/sync-1")).json()
    assert conversation["system"] == "Be terse."
    assert conversation["model"] == "m-sync"
    assert conversation["message_count"] == 6


async def test_streaming_with_include_usage(stack: Stack, gateway: FakeGateway) -> None:
    await stack.sdk.chat.completions.create(
        model="m-s", messages=[user("first")], extra_headers=CONVERSATION
    )
    raw = await stack.sdk.chat.completions.with_raw_response.create(
        model="m-s",
        messages=[user("stream this please")],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=CONVERSATION,
    )
    # The conversation is known before the first byte: it travels in the headers.
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["X-Conversation-Id"] == "chat-1"
    assert raw.headers["X-Conversation-Messages"] == "4"
    assert raw.headers["X-Context-Messages"] == "3"
    chunks = [chunk async for chunk in raw.parse()]
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "reply to: stream this please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in body)
    assert gateway.received[-1]["stream_options"] == {"include_usage": True}
    assert [m["content"] for m in gateway.received[-1]["messages"]] == [
        "first",
        "reply to: first",
        "stream this please",
    ]
    assert (await stored(stack))[-1] == assistant("reply to: stream this please")


async def test_usage_is_sent_only_to_a_client_that_asked(
    stack: Stack, gateway: FakeGateway
) -> None:
    raw = await stack.http.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [user("no usage")], "stream": True},
        headers=CONVERSATION,
    )
    lines = [line for line in raw.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)  # OpenAI's SSE, nothing else
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)
    # The service asked the gateway for usage anyway: the token correction needs it.
    assert gateway.received[-1]["stream_options"] == {"include_usage": True}
    conversation = (await stack.http.get("/conversations/chat-1")).json()
    assert conversation["usage"]["output_tokens"] > 0


async def test_sync_client_streams(stack: Stack) -> None:
    sdk = stack.sync_sdk()

    def stream() -> str:
        chunks = sdk.chat.completions.create(
            model="m", messages=[user("sync stream")], stream=True, extra_headers=CONVERSATION
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert await asyncio.to_thread(stream) == "reply to: sync stream"
    assert len(await stored(stack)) == 2


async def test_a_tool_call_and_its_result_over_two_calls(
    stack: Stack, gateway: FakeGateway
) -> None:
    call = {
        "id": "call-7",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
    }
    tools: list[ChatCompletionFunctionToolParam] = [
        {"type": "function", "function": {"name": "weather", "parameters": {}}}
    ]
    gateway.tool_calls = [call]
    first = await stack.sdk.chat.completions.create(
        model="m", messages=[user("Weather in Paris?")], tools=tools, extra_headers=CONVERSATION
    )
    (choice,) = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (called,) = choice.message.tool_calls
    assert called.id == "call-7"
    assert called.type == "function"
    assert called.function.name == "weather"
    assert called.function.arguments == '{"city": "Paris"}'
    gateway.tool_calls = None
    second = await stack.sdk.chat.completions.create(
        model="m",
        messages=[{"role": "tool", "tool_call_id": "call-7", "content": "sunny"}],
        tools=tools,
        extra_headers=CONVERSATION,
    )
    assert second.choices[0].message.content == "reply to: sunny"
    assert gateway.received[-1]["messages"] == [
        user("Weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call-7", "content": "sunny"},
    ]
    assert gateway.received[-1]["tools"] == tools


async def test_a_streamed_tool_call(stack: Stack, gateway: FakeGateway) -> None:
    call = {"id": "call-9", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    gateway.tool_calls = [call]
    chunks = [
        c
        async for c in await stack.sdk.chat.completions.create(
            model="m", messages=[user("call f")], stream=True, extra_headers=CONVERSATION
        )
    ]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == "call-9"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == '{"a":1}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert (await stored(stack))[-1]["tool_calls"] == [call]


@pytest.mark.parametrize(
    ("failure", "error", "status", "said"),
    [
        (
            Failure(400, {"error": {"message": "unknown model", "metadata": {"errors": ["x"]}}}),
            openai.BadRequestError,
            400,
            "unknown model: x",
        ),
        (Failure(503, {"error": "down"}), openai.InternalServerError, 502, "status 503: down"),
        (
            Failure(429, {"error": "slow down"}, {"retry-after": "60"}),
            openai.RateLimitError,
            429,
            "rate limit: slow down",
        ),
    ],
)
async def test_gateway_errors_surface_as_the_sdks_own_exceptions(
    stack: Stack,
    gateway: FakeGateway,
    redis: Redis,
    failure: Failure,
    error: type[openai.APIStatusError],
    status: int,
    said: str,
) -> None:
    gateway.failures = [failure]
    with pytest.raises(error) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=[user("hi")], extra_headers=CONVERSATION
        )
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "code", "param"}
    assert caught.value.message == f"Error code: {status} - {body['message']}"
    assert said in body["message"]
    assert await redis.exists("conv:{acme:chat-1}:log") == 0


async def test_our_own_errors_in_openai_shape(stack: Stack) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=[user("hi")], extra_body={"api_base": "http://evil"}
        )
    assert caught.value.code == "invalid_request"
    assert caught.value.param == "api_base"
    assert "GATEWAY_EXTRA_PARAMS" in caught.value.message
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=[user("a"), {"role": "system", "content": "late"}]
        )
    assert caught.value.param == "messages.1.role"
    with pytest.raises(openai.UnprocessableEntityError):
        await stack.sdk.chat.completions.create(
            model="m", messages=[user("a")], extra_headers={"X-Conversation-Id": "-bad"}
        )
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=[user("a")], metadata={"conversation_id": "no spaces"}
        )
    assert "conversation id" in caught.value.message
    bad_key = stack.async_sdk(key="wrong")
    with pytest.raises(openai.AuthenticationError) as denied:
        await bad_key.chat.completions.create(model="m", messages=[user("a")])
    assert denied.value.type == "authentication_error"
    # Errors from the request middleware, outside any route, take the same shape on /v1 only.
    wrong_type = await stack.http.post(
        "/v1/chat/completions", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415
    assert wrong_type.headers["content-type"] == "application/json"
    assert wrong_type.json()["error"]["code"] == "unsupported_media_type"
    own = await stack.http.post(
        "/conversations/c/messages", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert own.headers["content-type"] == "application/problem+json"


async def test_a_mid_stream_error_raises_the_sdks_api_error(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_error_after_first = {"error": {"message": "provider overloaded"}}
    stream = await stack.sdk.chat.completions.create(
        model="m", messages=[user("hi")], stream=True, extra_headers=CONVERSATION
    )
    received: list[ChatCompletionChunk] = []

    async def read() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as caught:
        await read()
    assert "provider overloaded" in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "api_error"
    assert len(received) == 1
    assert await redis.exists("conv:{acme:chat-1}:log") == 0


async def test_a_retry_with_the_same_idempotency_key_stores_the_turn_once(
    stack: Stack, gateway: FakeGateway
) -> None:
    # openai-python sends no Idempotency-Key of its own (its OpenAI client sets no idempotency
    # header): the key is the caller's, in extra_headers, and every retry repeats it.
    lossy = LosingFirstAnswer(stack.app)
    sdk = stack.async_sdk(lossy, max_retries=2)
    answer = await sdk.chat.completions.with_raw_response.create(
        model="m",
        messages=[user("only once")],
        extra_headers={**CONVERSATION, "Idempotency-Key": "turn-42"},
    )
    assert len(lossy.attempts) == 2
    assert [h["idempotency-key"] for h in lossy.attempts] == ["turn-42", "turn-42"]
    assert lossy.attempts[1]["x-stainless-retry-count"] == "1"
    assert answer.headers["Idempotent-Replayed"] == "true"
    assert answer.parse().choices[0].message.content == "reply to: only once"
    assert len(gateway.received) == 1
    assert await stored(stack) == [user("only once"), assistant("reply to: only once")]


async def test_a_stream_retried_with_its_key_is_replayed_as_openai_sse(
    stack: Stack, gateway: FakeGateway
) -> None:
    headers = {**CONVERSATION, "Idempotency-Key": "stream-1"}

    async def text() -> tuple[str, httpx2.Headers]:
        raw = await stack.sdk.chat.completions.with_raw_response.create(
            model="m",
            messages=[user("twice")],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        chunks = [c async for c in raw.parse()]
        assert chunks[-1].usage is not None
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), raw.headers

    first, _ = await text()
    again, replay_headers = await text()
    assert first == again == "reply to: twice"
    assert replay_headers["Idempotent-Replayed"] == "true"
    assert replay_headers["X-Conversation-Messages"] == "2"
    assert len(gateway.received) == 1


async def test_stateless_pass_through_stores_nothing(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        user("one"),
        assistant("two"),
        user("three"),
    ]
    answer = await stack.sdk.chat.completions.create(
        model="m", messages=messages, max_completion_tokens=50, user="end-user-7"
    )
    fully_populated(answer, "reply to: three", "m")
    chunks = [
        c
        async for c in await stack.sdk.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "reply to: three"
    )
    assert chunks[-1].usage is not None
    # As sent: the system message stays in place, max_completion_tokens is the gateway's
    # max_tokens, and `user` (meaningless to the gateway) is dropped.
    assert gateway.received[0] == {"model": "m", "messages": messages, "max_tokens": 50}
    assert gateway.received[1]["messages"] == messages
    assert await redis.keys("*") == []


async def test_stateless_stream_error_and_ignored_stream(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.ignore_stream = True
    chunks = [
        c
        async for c in await stack.sdk.chat.completions.create(
            model="m", messages=[user("plain json")], stream=True
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "reply to: plain json"
    )
    assert all(c.usage is None for c in chunks)
    gateway.ignore_stream = False
    gateway.stream_fail_after_first = True
    stream = await stack.sdk.chat.completions.create(
        model="m", messages=[user("breaks")], stream=True
    )

    async def read() -> None:
        async for _ in stream:
            pass

    with pytest.raises(openai.APIError) as caught:
        await read()
    assert "broke off" in caught.value.message
    assert await redis.keys("*") == []


async def test_a_stateless_stream_answered_by_a_non_completion_is_an_error(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    """A gateway that ignores `stream: true` and answers JSON that is no completion: the
    stateless stream says so (as a turn's stream does), never an empty answer and [DONE]."""
    gateway.failures = [Failure(200, {"foo": 1})]
    stream = await stack.sdk.chat.completions.create(
        model="m", messages=[user("anything")], stream=True
    )

    async def read() -> list[Any]:
        return [chunk async for chunk in stream]

    with pytest.raises(openai.APIError) as caught:
        await read()
    assert "no choices" in caught.value.message
    assert await redis.keys("*") == []


@pytest.mark.parametrize("conversation", [None, "usage-late"])
async def test_usage_on_the_finishing_chunk_reaches_a_client_that_asked(
    stack: Stack, gateway: FakeGateway, conversation: str | None
) -> None:
    """A gateway that puts usage on the finish_reason chunk: the client that asked for usage
    still gets OpenAI's usage chunk (no choices) before [DONE]; one that did not, no usage."""
    gateway.usage_on_finish_chunk = True
    headers = {"X-Conversation-Id": conversation} if conversation else {}
    chunks = [
        c
        async for c in await stack.sdk.chat.completions.create(
            model="m",
            messages=[user("count me")],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
    ]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    quiet = [
        c
        async for c in await stack.sdk.chat.completions.create(
            model="m", messages=[user("quiet")], stream=True, extra_headers=headers
        )
    ]
    assert all(c.usage is None for c in quiet)
    assert all(c.choices for c in quiet)


async def test_models_lists_the_gateways_catalog(stack: Stack, gateway: FakeGateway) -> None:
    gateway.catalog = [
        {"id": "claude-sonnet-4-6", "context_length": 200_000, "owned_by": "anthropic"},
        {"id": "gpt-5", "context_length": 400_000},
        {"no": "id"},
    ]
    models = [m async for m in stack.sdk.models.list()]
    assert [m.id for m in models] == ["claude-sonnet-4-6", "gpt-5"]
    assert [m.owned_by for m in models] == ["anthropic", "llm-gateway"]
    assert {m.object for m in models} == {"model"}
    reads = gateway.catalog_reads
    await stack.sdk.models.list()  # within a minute: the copy in memory
    assert gateway.catalog_reads == reads


async def test_models_when_the_catalog_was_never_read(
    settings: Settings, gateway: FakeGateway
) -> None:
    gateway.catalog = None
    async with stack_for(settings, gateway) as stack:
        with pytest.raises(openai.InternalServerError) as caught:
            await stack.sdk.models.list()
    assert caught.value.status_code == 502


async def test_pass_through_mode_takes_the_sdks_bearer_key(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = make_settings(redis_url, api_keys=None, gateway_api_key=None)
    async with stack_for(settings, gateway) as stack:
        for key in ("caller-gw-key-1", "caller-gw-key-2"):
            sdk = stack.async_sdk(key=key)
            await sdk.chat.completions.create(
                model="m", messages=[user(key)], extra_headers=CONVERSATION
            )
    # The caller's own key went upstream as it came; each key is a tenant of its own.
    assert [h["authorization"] for h in gateway.received_headers] == [
        "caller-gw-key-1",
        "caller-gw-key-2",
    ]
    assert [len(r["messages"]) for r in gateway.received] == [1, 1]


async def test_tenants_stay_apart_on_v1(stack: Stack, gateway: FakeGateway) -> None:
    await stack.sdk.chat.completions.create(
        model="m", messages=[user("mine")], extra_headers=CONVERSATION
    )
    other = stack.async_sdk(key=OTHER_KEY)
    await other.chat.completions.create(
        model="m", messages=[user("theirs")], extra_headers=CONVERSATION
    )
    assert gateway.received[-1]["messages"] == [user("theirs")]


async def test_parameters_are_checked_as_on_our_own_route(stack: Stack, redis: Redis) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=[user("a")], extra_body={"max_tokens": "many"}
        )
    assert caught.value.param == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=[user("a")], extra_headers={"X-Detach": "true"}
        )
    assert "X-Detach" in caught.value.message
    assert await redis.keys("*") == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("system", "a system prompt by another way"),
        ("detach", True),
        ("message", {"role": "user", "content": "m"}),
        ("replace_from", 1),
    ],
)
@pytest.mark.parametrize("conversation", [None, "own-fields"])
async def test_our_own_routes_fields_are_not_openais(
    stack: Stack,
    gateway: FakeGateway,
    redis: Redis,
    field: str,
    value: Any,
    conversation: str | None,
) -> None:
    """`system`, `detach`, `message`, `replace_from` belong to POST /conversations/{id}/messages;
    on /v1 they are unknown fields (422 naming them), not a way around OpenAI's request."""
    headers = {"X-Conversation-Id": conversation} if conversation else {}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m",
            messages=[user("a")],
            stream=True,
            extra_body={field: value},
            extra_headers=headers,
        )
    assert caught.value.param == field
    assert gateway.received == []
    assert await redis.keys("*") == []


async def test_pings_reach_the_client_while_the_gateway_thinks(
    settings: Settings, gateway: FakeGateway
) -> None:
    gateway.stream_gate = gate = asyncio.Event()
    async with (
        serving(settings, gateway, sse_ping_seconds=0.05) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "m", "messages": [user("slow")], "stream": True},
            headers=CONVERSATION,
        ) as response,
    ):
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if line == ": ping":  # the upstream holds its stream: only pings can come
                gate.set()
    assert lines[-2:] == ["data: [DONE]", ""]
    assert ": ping" in lines
    assert all(line.startswith(("data: ", ": ping")) for line in lines if line)


async def test_x_detach_runs_a_detached_turn_read_as_openai_sse(
    stack: Stack, gateway: FakeGateway
) -> None:
    headers = {**CONVERSATION, "X-Detach": "true"}
    chunks = [
        c
        async for c in await stack.sdk.chat.completions.create(
            model="m", messages=[user("keep going")], stream=True, extra_headers=headers
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "reply to: keep going"
    )
    raw = await stack.http.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [user("again")], "stream": True},
        headers=headers,
    )
    blocks = [b for b in raw.text.split("\n\n") if b]
    # Each event carries the detached turn's id (as on our own route), so it can be resumed.
    assert all(b.startswith("id: ") for b in blocks)
    assert blocks[-1].endswith("data: [DONE]")
    turn_id = blocks[0].split("\n")[0].removeprefix("id: ").rsplit("-", 1)[0]
    status = (await stack.http.get("/conversations/chat-1")).json()["turn"]
    assert status == {"id": turn_id, "state": "done", "detached": True}
    resumed = await stack.http.get("/conversations/chat-1/stream", params={"after": "1"})
    assert resumed.status_code == 200
    assert resumed.text.rstrip().endswith("data: [DONE]")
    assert [m["content"] for m in await stored(stack)] == [
        "keep going",
        "reply to: keep going",
        "again",
        "reply to: again",
    ]


async def test_max_completion_tokens_may_be_an_integral_float(
    stack: Stack, gateway: FakeGateway
) -> None:
    """JSON has one number type: 5.0 is the integer 5 to the schema, so to the route too."""
    response = await stack.http.post(
        "/v1/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 5.0,
        },
    )
    assert response.status_code == 200, response.text
    assert gateway.received[-1]["max_tokens"] == 5
