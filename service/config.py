"""Settings: the only place the environment is read."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    HttpUrl,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import end_user_auth, rate_limits

_TENANT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
    "rediss+sentinel://",
)


class Settings(BaseSettings):
    """Every knob of the service; names match CONTRACT.md's environment variables."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    redis_url: str | None = None  # None: start an embedded redis-server under data_dir
    data_dir: Path = Path("./data")
    redis_pool_size: int = Field(default=512, ge=1)
    redis_pool_timeout_seconds: float = Field(default=5.0, gt=0)

    gateway_url: HttpUrl = HttpUrl("https://llm-gateway.assemblyai.com/v1")
    gateway_api_key: SecretStr | None = None
    gateway_timeout_seconds: float = Field(default=120.0, gt=0)
    gateway_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    gateway_max_retries: int = Field(default=2, ge=0, le=10)
    gateway_retry_after_cap_seconds: float = Field(default=10.0, ge=0)
    gateway_max_connections: int = Field(default=1000, ge=1)
    # The LLM Gateway documents a raw key (`Authorization: <key>`); OpenAI-style gateways want
    # `Bearer <key>`. Raw by default: it is what the default GATEWAY_URL documents.
    gateway_auth_scheme: Literal["bearer", "raw"] = "raw"
    sse_ping_seconds: float = Field(default=15.0, gt=0)

    api_keys: SecretStr | None = None  # "name:key,name2:key2"
    default_model: str = "claude-sonnet-4-6"
    token_budget: int = Field(default=16_000, ge=64)
    conversation_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=0)

    lock_wait_seconds: float = Field(default=30.0, ge=0)
    lock_ttl_seconds: float = Field(default=10.0, ge=1)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=1)

    cors_origins: str = ""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on every interface
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    log_level: str = "info"
    shutdown_timeout_seconds: float = Field(default=30.0, ge=0)
    # Above a load balancer's idle timeout (nginx: 60 s), so the balancer, not uvicorn,
    # closes idle keep-alive connections and never sends a request onto a closing socket.
    keepalive_timeout_seconds: int = Field(default=75, ge=1)

    # Hardening (issues 9 and 17): what one caller may send, store and hold open.
    max_token_budget: int = Field(default=200_000, ge=64)
    # 0: no cap, and conversations may be kept forever (`ttl_seconds: 0`).
    max_conversation_ttl_seconds: int = Field(default=90 * 24 * 3600, ge=0)
    gateway_extra_params: str = ""  # comma-separated extra body fields forwarded upstream
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    max_concurrency: int = Field(default=2000, ge=1)  # connections and tasks per process

    # Cache-stable windows (issue 11): an overflowing window jumps back to this share of the budget.
    trim_low_water: float = Field(default=0.6, gt=0, le=1)
    # Models that cache only at explicit breakpoints (fnmatch patterns, comma-separated), and the
    # shortest prefix worth one (the provider caches nothing shorter).
    cache_control_models: str = "claude-*,anthropic/claude-*"
    cache_min_tokens: int = Field(default=1024, ge=0)

    # Rolling summaries of what falls out of the window (issue 11 section 3), opt-in.
    summary: Literal["off", "on"] = "off"
    summary_model: str | None = Field(default=None, max_length=200)  # None: the turn's model
    summary_max_tokens: int = Field(default=1024, ge=16, le=32_000)
    summary_retry_seconds: float = Field(default=60.0, ge=0)

    # End users (issue 13): browser front ends holding short-lived tokens instead of keys.
    end_user_jwt_secrets: SecretStr | None = None  # "tenant:<base64>,..." (HS256)
    end_user_jwks_urls: str = ""  # "tenant:<url>,..." (RS256 / ES256)
    end_user_token_max_seconds: int = Field(default=3600, ge=1)
    end_user_rate: str = ""  # "20/minute" or "acme:20/minute,..."; empty: unlimited
    tenant_rate: str = ""
    demo_page: bool = False

    # Detached turns (issue 16): how long a finished turn's events stay readable, and how many.
    detached_ttl_seconds: int = Field(default=3600, ge=1)
    detached_max_events: int = Field(default=10_000, ge=100)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(_REDIS_SCHEMES):
            raise ValueError(f"REDIS_URL must start with one of {', '.join(_REDIS_SCHEMES)}")
        return value

    @field_validator("summary_model")
    @classmethod
    def _summary_model(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("LOG_LEVEL must be one of critical, error, warning, info, debug")
        return level

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        _parse_api_keys(value.get_secret_value())  # fail at start-up, not per request
        return value

    @field_validator("end_user_jwt_secrets")
    @classmethod
    def _end_user_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        end_user_auth.parse_secrets(value.get_secret_value())  # fail at start-up
        return value

    @field_validator("end_user_jwks_urls")
    @classmethod
    def _jwks_urls(cls, value: str) -> str:
        end_user_auth.parse_jwks_urls(value)
        return value

    @field_validator("end_user_rate", "tenant_rate")
    @classmethod
    def _rates(cls, value: str, info: ValidationInfo) -> str:
        rate_limits.parse_rates(value, str(info.field_name).upper())
        return value

    @model_validator(mode="after")
    def _client_mode_needs_gateway_key(self) -> Settings:
        if self.api_keys is not None and self.gateway_api_key is None:
            raise ValueError("API_KEYS needs GATEWAY_API_KEY: client keys are never sent upstream")
        return self

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> Settings:
        if self.token_budget > self.max_token_budget:
            raise ValueError("TOKEN_BUDGET must not exceed MAX_TOKEN_BUDGET")
        ttl = self.conversation_ttl_seconds
        if "max_conversation_ttl_seconds" not in self.model_fields_set and (
            ttl == 0 or ttl > self.max_conversation_ttl_seconds
        ):
            # CONVERSATION_TTL_SECONDS alone is the operator's choice (the contract's "0 =
            # never"): a default cap under it follows it, as if set to it; 0 lifts the cap.
            self.max_conversation_ttl_seconds = ttl
        cap = self.max_conversation_ttl_seconds
        if cap and not 0 < ttl <= cap:
            raise ValueError(
                "CONVERSATION_TTL_SECONDS must be 1..MAX_CONVERSATION_TTL_SECONDS "
                "(never expiring needs MAX_CONVERSATION_TTL_SECONDS=0)"
            )
        return self

    def cache_control_patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.cache_control_models.split(",") if p.strip())

    def extra_gateway_params(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.gateway_extra_params.split(",") if p.strip())

    def client_keys(self) -> dict[str, str]:
        """Client key -> tenant name; empty means pass-through mode."""
        if self.api_keys is None:
            return {}
        return _parse_api_keys(self.api_keys.get_secret_value())

    def end_user_secrets(self) -> dict[str, bytes]:
        if self.end_user_jwt_secrets is None:
            return {}
        return end_user_auth.parse_secrets(self.end_user_jwt_secrets.get_secret_value())

    def end_user_jwks(self) -> dict[str, str]:
        return end_user_auth.parse_jwks_urls(self.end_user_jwks_urls)

    def rate_tables(self) -> tuple[rate_limits.RateTable, rate_limits.RateTable]:
        """(TENANT_RATE, END_USER_RATE)."""
        return (
            rate_limits.parse_rates(self.tenant_rate, "TENANT_RATE"),
            rate_limits.parse_rates(self.end_user_rate, "END_USER_RATE"),
        )

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]


def _parse_api_keys(raw: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in raw.split(","):
        if not pair.strip():
            continue
        name, sep, key = pair.strip().partition(":")
        if not sep or not key or not _TENANT_NAME.match(name):
            raise ValueError(
                "API_KEYS must be comma-separated name:key pairs, names of A-Z a-z 0-9 . _ -"
            )
        keys[key] = name
    return keys


@lru_cache
def get_settings() -> Settings:
    return Settings()
