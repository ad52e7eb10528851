# Two commands matter: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check lint fmt typecheck bench image

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# nginx for the load-balancer end-to-end test (Debian's package; installed when missing).
$(VENV)/.nginx: $(STAMP)
	command -v nginx || test -x /usr/sbin/nginx || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx)
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m service

test: lint typecheck $(VENV)/.nginx
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

bench: $(STAMP)
	$(BIN)/python -m bench

image:
	docker build -t conversation-proxy .
