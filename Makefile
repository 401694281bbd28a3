# Two commands on a fresh clone: `make run` and `make test`. Both build on `make install`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8000
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install install-test run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first and pinned: the CPU wheel on disk; a looser pin pulls a CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,dev,cloud]'
	# The review-page tests drive Debian's chromium through playwright (no browser download).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/safeedit serve --host $(HOST) --port $(PORT)

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check . && $(BIN)/mypy guard adapters proxy.py

bench: install-test
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/loop_latency.py

clean:
	rm -rf $(VENV) var .pytest_cache
