"""GatewayClient against scripted upstream behaviour: retries, timeouts, error mapping."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from service.errors import GatewayError, GatewayTimeout, ServiceError, Unauthorized
from service.gateway import GatewayClient, Reply
from service.models import JSONObject

COMPLETION = b'{"choices": [{"message": {"role": "assistant", "content": "hi"}}], "usage": {}}'
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "a"}]}


class Upstream:
    """Answers each call from a list of behaviours: a response, or an exception to raise."""

    def __init__(self, *behaviours: httpx.Response | Exception) -> None:
        self.behaviours = list(behaviours)
        self.calls: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        behaviour = self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]
        if isinstance(behaviour, Exception):
            raise behaviour
        return behaviour


def client_for(
    upstream: Upstream, *, key: str | None = "gw-key", retries: int = 2, timeout: float = 5.0
) -> Callable[[], GatewayClient]:
    def make() -> GatewayClient:
        http = httpx.AsyncClient(
            transport=httpx.MockTransport(upstream.handle), base_url="http://gw/v1/"
        )
        return GatewayClient(
            http,
            api_key=SecretStr(key) if key else None,
            timeout_seconds=timeout,
            max_retries=retries,
            retry_after_cap_seconds=1,
        )

    return make


async def complete(
    upstream: Upstream, *, key: str | None = "gw-key", retries: int = 2
) -> tuple[JSONObject, Reply]:
    gateway = client_for(upstream, key=key, retries=retries)()
    try:
        return await gateway.complete(PAYLOAD, client_key="client", request_id="r1")
    finally:
        await gateway._http.aclose()


async def test_connection_errors_are_retried_then_502() -> None:
    upstream = Upstream(httpx.ConnectError("refused"))
    with pytest.raises(GatewayError, match="unreachable"):
        await complete(upstream, retries=2)
    assert len(upstream.calls) == 3


async def test_a_connection_error_then_an_answer_succeeds() -> None:
    upstream = Upstream(httpx.ConnectError("reset"), httpx.Response(200, content=COMPLETION))
    _, reply = await complete(upstream)
    assert reply.message["content"] == "hi"
    assert len(upstream.calls) == 2
    assert upstream.calls[0].content == upstream.calls[1].content  # the same body each time
    assert upstream.calls[0].headers["authorization"] == "gw-key"


async def test_5xx_without_retry_after_backs_off_and_retries() -> None:
    upstream = Upstream(
        httpx.Response(502, text="bad gateway", headers={"retry-after": "soon"}),
        httpx.Response(200, content=COMPLETION),
    )
    await complete(upstream, retries=1)
    assert len(upstream.calls) == 2


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (httpx.ReadTimeout("slow"), GatewayTimeout),
        (httpx.Response(200, text="<html>oops</html>"), GatewayError),
        (httpx.Response(401, json={"error": "bad key"}), GatewayError),
    ],
)
async def test_failures_map_to_service_errors(
    behaviour: httpx.Response | Exception, error: type[ServiceError]
) -> None:
    upstream = Upstream(behaviour)
    with pytest.raises(error):
        await complete(upstream, retries=0)
    assert len(upstream.calls) == 1


async def test_pass_through_key_rejected_upstream_is_401() -> None:
    upstream = Upstream(httpx.Response(403, json={"error": {"message": "invalid key"}}))
    with pytest.raises(Unauthorized, match="invalid key"):
        await complete(upstream, key=None)
    assert upstream.calls[0].headers["authorization"] == "client"


async def test_no_key_at_all_never_calls_upstream() -> None:
    upstream = Upstream(httpx.Response(200, content=COMPLETION))
    gateway = client_for(upstream, key=None)()
    with pytest.raises(Unauthorized):
        await gateway.complete(PAYLOAD, client_key=None, request_id="r")
    await gateway._http.aclose()
    assert upstream.calls == []


async def test_a_stream_answered_with_broken_json_is_502() -> None:
    upstream = Upstream(httpx.Response(200, text="{nope", headers={"content-type": "text/plain"}))
    gateway = client_for(upstream)()
    with pytest.raises(GatewayError, match="not JSON"):
        await gateway.open_stream(PAYLOAD, client_key=None, request_id="r")
    await gateway._http.aclose()
    assert upstream.calls[0].read().count(b'"stream":true') == 1


async def test_a_stream_that_never_starts_is_504() -> None:
    upstream = Upstream(httpx.ConnectTimeout("no answer"))
    gateway = client_for(upstream, retries=0, timeout=0.05)()
    with pytest.raises(GatewayError):
        await gateway.open_stream(PAYLOAD, client_key=None, request_id="r")
    upstream.behaviours = [httpx.ReadTimeout("no answer")]
    with pytest.raises(GatewayTimeout):
        await gateway.open_stream(PAYLOAD, client_key=None, request_id="r")
    await gateway._http.aclose()
