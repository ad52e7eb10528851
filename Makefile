# Two commands matter: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One resolver: uv from PyPI, the version the Dockerfile's builder copies in, installs uv.lock here
# exactly as in the image (plus the dev and embedded extras).
UV_VERSION := 0.13.9
UV := UV_PYTHON_DOWNLOADS=never $(BIN)/python -m uv

.PHONY: install lock run demo test check lint fmt typecheck bench bench-instructions image mutate

$(VENV)/.uv-$(UV_VERSION):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	touch $@

$(STAMP): pyproject.toml uv.lock $(VENV)/.uv-$(UV_VERSION)
	$(UV) sync --locked --inexact --extra dev
	touch $(STAMP)

# nginx for the load-balancer end-to-end test (Debian's package; installed when missing).
$(VENV)/.nginx: $(STAMP)
	command -v nginx || test -x /usr/sbin/nginx || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx)
	touch $@

# Chromium for the demo page's browser test: Debian's package, driven by Playwright (which
# cannot download its own browsers here).
$(VENV)/.chromium: $(STAMP)
	command -v chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	touch $@

# The Vercel AI SDK for the /v1 test (tests/js): npm ci from its lock file (Debian's nodejs and
# npm when missing; the test's packages need Node.js 18 or later).
$(VENV)/.npm: $(STAMP) tests/js/package.json tests/js/package-lock.json
	command -v npm || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm)
	cd tests/js && npm ci --no-audit --no-fund
	touch $@

install: $(STAMP)

# After changing pyproject.toml's dependencies: resolve again and rewrite uv.lock.
lock: $(VENV)/.uv-$(UV_VERSION)
	$(UV) lock

run: $(STAMP)
	$(BIN)/python -m service

# The service with the chat page on and a demo user's token; prints the URL to open.
demo: $(STAMP)
	$(BIN)/python -m tests.demo_stack

test: lint typecheck $(VENV)/.nginx $(VENV)/.chromium $(VENV)/.npm
	$(BIN)/coverage erase && $(BIN)/coverage run -m pytest && $(BIN)/coverage combine -q && $(BIN)/coverage report --fail-under=95

check: test

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench

fmt: $(STAMP)
	$(BIN)/ruff format service tests bench
	$(BIN)/ruff check --fix service tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Mutation testing of trimming, estimates, the lease and idempotency ([tool.mutmut] in pyproject.toml;
# survivors and why they are left: tests/MUTATION.md). CPU heavy, so not part of `make test`.
mutate: $(STAMP)
	$(BIN)/mutmut run --max-children 2 && $(BIN)/mutmut results

bench: $(STAMP)
	$(BIN)/python -m bench

# Instructions per turn, the service's and the reference's (callgrind: the same on any machine).
bench-instructions: $(STAMP)
	command -v valgrind || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y valgrind)
	$(BIN)/python -m bench.instructions

image:
	docker build -t conversation-proxy .
