"""`python -m service`: serve with uvicorn, draining gracefully on SIGTERM."""

from __future__ import annotations

import gc
import logging
import math
import os
from types import FrameType

import uvicorn

from service import connections
from service.app import Lifecycle, create_app
from service.config import get_settings
from service.embedded_redis import EmbeddedRedis
from service.logs import configure_logging, logging_config


class _DrainingServer(uvicorn.Server):
    """Marks the app as draining (readiness false) the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._lifecycle.draining = True
        super().handle_exit(sig, frame)


# Young collections after 100,000 net new container objects (CPython's default: 700). A turn
# holds a few thousand (each stored message of its window is a dataclass with its dict), and
# objects freed by their reference count leave the count, so this is live growth, not garbage.
# Callgrind (bench/instructions.py): 20,000 -> 100,000 took 0.8% off a 21-message turn and 4% off
# a 200-message one, where the collector had traversed every in-flight window again and again.
GC_THRESHOLDS = (100_000, 20, 100)


def _tune_gc() -> None:
    """Start-up objects (modules, classes, pydantic schemas) leave the collector's view, and young
    collections run far less often: measured by `make bench`, full collections of the whole heap
    took up to 190 ms under 500 turns in flight and the collector a third of the CPU."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def graceful_shutdown_seconds(seconds: float) -> int:
    """uvicorn takes whole seconds and reads 0 as "do not wait" but None as "wait forever":
    round a fraction up, so a value under 1 never becomes an endless wait."""
    return math.ceil(seconds)


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_config": logging_config(settings.log_level),
        "timeout_graceful_shutdown": graceful_shutdown_seconds(settings.shutdown_timeout_seconds),
        "timeout_keep_alive": settings.keepalive_timeout_seconds,
        "proxy_headers": True,
        "server_header": False,
    }
    if settings.workers > 1:
        # Several processes share one embedded Redis, started here rather than in each worker.
        embedded = None
        if settings.redis_url is None:
            logging.getLogger("service").warning(
                "WORKERS > 1 without REDIS_URL: the workers share an embedded development Redis "
                "on this machine; other replicas cannot see it. Set REDIS_URL in production."
            )
            embedded = EmbeddedRedis(settings.data_dir)
            os.environ["REDIS_URL"] = embedded.start()
        try:
            uvicorn.run(
                "service.app:create_app",
                factory=True,
                workers=settings.workers,
                http="service.connections:HeaderDeadlineProtocol",
                **common,  # type: ignore[arg-type]
            )
        finally:
            if embedded is not None:
                embedded.stop()
        return
    lifecycle = Lifecycle()
    app = create_app(settings, lifecycle=lifecycle)
    _tune_gc()
    config = uvicorn.Config(app, **common)  # type: ignore[arg-type]
    connections.configure(config, settings.header_timeout_seconds)
    server = _DrainingServer(config, lifecycle)
    server.run()


if __name__ == "__main__":
    main()
