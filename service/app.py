"""create_app(): settings, the lifespan that owns every client, middleware, routes and handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TypedDict

import aiohttp
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import demo, detached_routes, editing_routes, end_user_routes, openai_routes, routes
from service.auth import Authenticator
from service.catalog import ModelCatalog
from service.chat import ChatService, TurnPolicy
from service.config import Settings, get_settings
from service.detached import DetachedPolicy, DetachedTurns
from service.editing import EditingService, EditPolicy
from service.embedded_redis import EmbeddedRedis
from service.end_user_auth import EndUserTokens
from service.errors import install_error_handlers
from service.gateway import GatewayClient
from service.log_edits import LogEditStore
from service.middleware import CORS_EXPOSED, RequestMiddleware
from service.openai_errors import OpenAIErrorShape
from service.openai_service import OpenAICompletions, StreamPolicy
from service.openapi import install_openapi
from service.rate_limits import RateLimiter
from service.redis_client import open_redis
from service.store import ConversationStore
from service.summaries import SummaryPolicy, SummaryService
from service.summary_store import SummaryStore
from service.turn_journal import TurnJournal

log = logging.getLogger("service")


@dataclass
class Lifecycle:
    """Flipped when the process starts draining, so /readyz fails before the listener closes."""

    draining: bool = False


class State(TypedDict):
    settings: Settings
    store: ConversationStore
    chat: ChatService
    detached: DetachedTurns
    edits: LogEditStore
    editing: EditingService
    authenticator: Authenticator
    end_user_tokens: EndUserTokens
    limiter: RateLimiter
    lifecycle: Lifecycle
    openai: OpenAICompletions
    catalog: ModelCatalog


def _gateway_session(settings: Settings) -> aiohttp.ClientSession:
    """One pool for every gateway call. No total timeout here: GatewayClient applies
    GATEWAY_TIMEOUT_SECONDS over a whole call, retries included."""
    connector = aiohttp.TCPConnector(
        limit=settings.gateway_max_connections, keepalive_timeout=30, ttl_dns_cache=300
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.gateway_connect_timeout_seconds,
        sock_read=settings.gateway_timeout_seconds,
    )
    # No cookies: one a gateway (or the balancer before it) sets would ride on every later call,
    # whichever tenant or end user makes it.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def _end_user_tokens(
    cfg: Settings, stack: AsyncExitStack, *, client_mode: bool
) -> EndUserTokens:
    """End-user tokens work in client-key mode only: in pass-through mode the caller's key goes
    upstream as it is, and a token must never reach the gateway."""
    secrets, jwks_urls = cfg.end_user_secrets(), cfg.end_user_jwks()
    if not client_mode and (secrets or jwks_urls):
        log.warning(
            "END_USER_JWT_SECRETS / END_USER_JWKS_URLS are unused without API_KEYS: "
            "pass-through mode neither mints nor accepts end-user tokens"
        )
    session = None
    if client_mode and jwks_urls:
        session = aiohttp.ClientSession()
        stack.push_async_callback(session.close)
    # Kept in pass-through mode too, so that a token sent there is known and refused.
    return EndUserTokens(
        secrets, jwks_urls, max_seconds=cfg.end_user_token_max_seconds, session=session
    )


def create_app(settings: Settings | None = None, *, lifecycle: Lifecycle | None = None) -> FastAPI:
    cfg = settings or get_settings()
    life = lifecycle or Lifecycle()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[State]:
        async with AsyncExitStack() as stack:
            redis_url = cfg.redis_url
            if redis_url is None:
                embedded = EmbeddedRedis(cfg.data_dir)
                redis_url = await asyncio.to_thread(embedded.start)
                stack.callback(embedded.stop)
                # Development only: each replica without REDIS_URL has a Redis of its own, so
                # replicas behind one balancer would each see different conversations.
                log.warning(
                    "REDIS_URL unset: embedded development Redis started; every replica "
                    "needs the same REDIS_URL in production",
                    extra={"data_dir": str(embedded.data_dir)},
                )
            redis, cluster = open_redis(
                redis_url,
                pool_size=cfg.redis_pool_size,
                pool_timeout_seconds=cfg.redis_pool_timeout_seconds,
            )
            stack.push_async_callback(redis.aclose)
            session = _gateway_session(cfg)
            stack.push_async_callback(session.close)
            store = ConversationStore(
                redis,
                cluster=cluster,
                conversation_ttl_seconds=cfg.conversation_ttl_seconds,
                idempotency_ttl_seconds=cfg.idempotency_ttl_seconds,
                index_ttl_seconds=cfg.max_conversation_ttl_seconds,
                pool_size=cfg.redis_pool_size,
                pool_timeout_seconds=cfg.redis_pool_timeout_seconds,
            )
            stack.push_async_callback(store.aclose)  # before the client's pool closes
            edits = LogEditStore(
                store,
                cluster=cluster,
                conversation_ttl_seconds=cfg.conversation_ttl_seconds,
                idempotency_ttl_seconds=cfg.idempotency_ttl_seconds,
                index_ttl_seconds=cfg.max_conversation_ttl_seconds,
            )
            tenant_rates, end_user_rates = cfg.rate_tables()
            limiter = RateLimiter(store, tenants=tenant_rates, end_users=end_user_rates)
            try:
                await store.load_scripts()
            except Exception:  # Redis may come later: /readyz says so, requests get 503
                log.warning("redis not reachable at start-up")
            client_keys = cfg.client_keys()
            if cfg.gateway_api_key is not None and not client_keys:
                log.warning(
                    "GATEWAY_API_KEY is unused without API_KEYS: pass-through mode "
                    "forwards each caller's own key"
                )
            end_user_tokens = await _end_user_tokens(cfg, stack, client_mode=bool(client_keys))
            gateway = GatewayClient(
                session,
                base_url=str(cfg.gateway_url),
                api_key=cfg.gateway_api_key if client_keys else None,
                timeout_seconds=cfg.gateway_timeout_seconds,
                max_retries=cfg.gateway_max_retries,
                retry_after_cap_seconds=cfg.gateway_retry_after_cap_seconds,
                auth_scheme=cfg.gateway_auth_scheme,
            )
            policy = TurnPolicy(
                default_model=cfg.default_model,
                token_budget=cfg.token_budget,
                lock_wait_seconds=cfg.lock_wait_seconds,
                lease_seconds=cfg.lock_ttl_seconds,
                turn_seconds=cfg.gateway_timeout_seconds,
                ping_seconds=cfg.sse_ping_seconds,
                trim_low_water=cfg.trim_low_water,
                cache_control_models=cfg.cache_control_patterns(),
                cache_min_tokens=cfg.cache_min_tokens,
            )
            summaries = SummaryService(
                SummaryStore(redis),
                gateway,
                SummaryPolicy(
                    enabled=cfg.summary == "on",
                    model=cfg.summary_model,
                    max_tokens=cfg.summary_max_tokens,
                    retry_seconds=cfg.summary_retry_seconds,
                    lease_seconds=cfg.lock_ttl_seconds,
                    timeout_seconds=cfg.gateway_timeout_seconds,
                    low_water=cfg.trim_low_water,
                ),
            )
            stack.push_async_callback(summaries.aclose)  # before the gateway session closes
            catalog = ModelCatalog(session, str(cfg.gateway_url))
            catalog.start()
            stack.push_async_callback(catalog.aclose)
            chat = ChatService(store, gateway, policy, summaries=summaries, catalog=catalog)
            detached = DetachedTurns(
                chat,
                TurnJournal(
                    redis,
                    ttl_seconds=cfg.detached_ttl_seconds,
                    max_events=cfg.detached_max_events,
                    turn_seconds=cfg.gateway_timeout_seconds,
                ),
                DetachedPolicy(
                    lease_seconds=cfg.lock_ttl_seconds,
                    ping_seconds=cfg.sse_ping_seconds,
                    cancel_wait_seconds=cfg.lock_wait_seconds,
                    shutdown_seconds=cfg.shutdown_timeout_seconds,
                ),
            )
            stack.push_async_callback(detached.aclose)  # its turns need Redis and the gateway
            editing = EditingService(edits, EditPolicy(lock_wait_seconds=cfg.lock_wait_seconds))
            openai = OpenAICompletions(
                chat,
                detached,
                editing,
                gateway,
                StreamPolicy(
                    turn_seconds=cfg.gateway_timeout_seconds, ping_seconds=cfg.sse_ping_seconds
                ),
                allowed_extra=cfg.extra_gateway_params(),
            )
            log.info(
                "started",
                extra={
                    "mode": "client-keys" if client_keys else "pass-through",
                    "cluster": cluster,
                },
            )
            yield {
                "settings": cfg,
                "store": store,
                "chat": chat,
                "detached": detached,
                "edits": edits,
                "editing": editing,
                "authenticator": Authenticator(client_keys, end_user_tokens),
                "end_user_tokens": end_user_tokens,
                "limiter": limiter,
                "lifecycle": life,
                "openai": openai,
                "catalog": catalog,
            }
            life.draining = True
            log.info("stopping")

    turn = routes.turn_route()
    app = FastAPI(
        title="conversation-proxy",
        version="0.1.0",
        lifespan=lifespan,
        description="A stateful conversation proxy in front of an LLM gateway.",
        strict_content_type=False,  # no Content-Type: read as JSON (others get 415 first)
        # Prometheus is this service's telemetry (GET /metrics). FastAPI's native OpenTelemetry
        # hook, with no provider configured, only asked the global providers on every request
        # whether one was: 9 us of CPU each (issue 10).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        routes=[turn],  # the first route the app's router tries: service/routes.py
    )
    app.include_router(routes.router)
    app.include_router(detached_routes.router)
    app.include_router(editing_routes.router)
    app.include_router(end_user_routes.router)
    app.include_router(routes.ops)
    app.include_router(openai_routes.router)
    own_routes = [
        turn,
        *routes.router.routes,
        *detached_routes.router.routes,
        *editing_routes.router.routes,
        *end_user_routes.router.routes,
        *routes.ops.routes,
        *openai_routes.router.routes,
    ]
    if cfg.demo_page:
        app.include_router(demo.router)
        own_routes += demo.router.routes
    install_openapi(app, cfg)
    install_error_handlers(app, own_routes)
    origins = cfg.cors_origin_list()
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "X-Request-ID",
                "X-Conversation-Id",  # /v1/chat/completions (service/openai_routes.py)
                "X-Detach",
            ],
            expose_headers=CORS_EXPOSED.split(", "),
        )
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=cfg.max_body_bytes,
        cors_origins=origins,
        body_timeout_seconds=cfg.body_timeout_seconds,
        max_concurrency=cfg.max_concurrency,
    )
    # Outermost: OpenAI's error shape under /v1/, whichever layer answered the error.
    app.add_middleware(OpenAIErrorShape)
    return app
