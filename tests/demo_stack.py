"""`make demo`: the service with the chat page on, a token for a demo user, and the URL to open.

Without GATEWAY_API_KEY in the environment the stand-in gateway answers (it echoes, streamed);
with GATEWAY_API_KEY (and GATEWAY_URL if not the default) the real gateway does. Redis is
REDIS_URL's, or the service's embedded development Redis. Ctrl-C stops everything.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

import httpx

from tests.processes import ManagedProcess, start_gateway, start_replicas, stop_all

DEMO_USER = "demo-user"


def demo_env(gateway_url: str | None) -> dict[str, str]:
    """A demo tenant with a fresh key and token secret; the stand-in gateway unless a real
    gateway key is in the environment."""
    env = {
        "API_KEYS": f"demo:{secrets.token_urlsafe(24)}",
        "END_USER_JWT_SECRETS": f"demo:{base64.b64encode(secrets.token_bytes(32)).decode()}",
        "DEMO_PAGE": "1",
        "LOG_LEVEL": "info",
    }
    if gateway_url is not None:
        return env | {"GATEWAY_URL": gateway_url}
    gateway = os.environ.get("GATEWAY_URL", "https://llm-gateway.assemblyai.com/v1")
    return env | {"GATEWAY_URL": gateway, "GATEWAY_API_KEY": os.environ["GATEWAY_API_KEY"]}


def mint(service_url: str, client_key: str) -> str:
    answer = httpx.post(
        f"{service_url}/end-user-tokens",
        headers={"Authorization": f"Bearer {client_key}"},
        json={"sub": DEMO_USER, "conv": f"{DEMO_USER}:*", "ttl_seconds": 3600},
    )
    answer.raise_for_status()
    token: str = answer.json()["token"]
    return token


def main() -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="convproxy-demo-"))
    running: list[ManagedProcess] = []

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        gateway_url = None
        if not os.environ.get("GATEWAY_API_KEY"):
            gateway = start_gateway(log_dir)
            running.append(gateway)
            gateway_url = gateway.base_url
        env = demo_env(gateway_url)
        # REDIS_URL unset: the service's embedded development Redis, data under ./data.
        (service,) = start_replicas(
            1, os.environ.get("REDIS_URL", ""), env["GATEWAY_URL"], log_dir=log_dir, **env
        )
        running.append(service)
        token = mint(service.url, env["API_KEYS"].partition(":")[2])
        print(f"logs: {log_dir}")  # noqa: T201 - a command-line tool's output
        print(f"open: {service.url}/demo#token={token}", flush=True)  # noqa: T201
        return service.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all(running)


if __name__ == "__main__":
    sys.exit(main())
