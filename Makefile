# The two set-up commands are `make dev` and `make test`; both create .venv on their own.
# `make dev ARGS=-free-ports` passes flags to `weft dev` (see `weft dev --help`).
PYTHON ?= python3
ARGS   ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev test test-unit test-integration test-abuse lint bench proto clean

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/weft dev $(ARGS)

test: $(STAMP)
	sh tests/browser/install.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# The abuse tier alone: attacks of issue 9 at real sidecars (also part of `make test`).
test-abuse: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m abuse tests/abuse

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy weft devmesh catalog devagent consulkit ca policies sidecar benchmarks
	$(BIN)/lint-imports setup.cfg

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Regenerates the gRPC modules from the .proto files (the generated files are committed).
proto: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m weft.protogen

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
