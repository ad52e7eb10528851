from __future__ import annotations

import httpx

from tests.fake_gateway import FakeGateway


async def test_two_turns(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    first = await client.post(
        "/conversations/c1/messages",
        json={"message": {"role": "user", "content": "What is the capital of France?"}},
    )
    assert first.status_code == 200, first.text
    second = await client.post(
        "/conversations/c1/messages",
        json={"message": {"role": "user", "content": "What's the population?"}},
    )
    assert second.status_code == 200, second.text
    assert len(gateway.received[1]["messages"]) == 3
    print(second.json())
