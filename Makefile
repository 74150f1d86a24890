# The two set-up commands of the README are the contract: `make demo` and `make test`
# each build the virtualenv from pinned requirements (once; a second run only checks a stamp).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export STREAMLEARN_HOME ?= $(CURDIR)/.streamlearn

.PHONY: help venv demo test test-fast lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the pinned dependencies

demo: $(STAMP) ## run the whole platform on the embedded broker for a while and write a report
	$(BIN)/streamlearn demo

# Two pytest workers (pytest-xdist), one embedded broker each: most tests wait on subprocesses and the
# broker, so two workers keep a 2-core box busy. --dist loadfile keeps a file's tests (and its module
# fixtures) in one worker. TEST_WORKERS=0 runs them in this process, one at a time. --durations: the
# slowest tests are in every CI log, so a suite that grows slower shows where.
TEST_WORKERS ?= 2
test: $(STAMP) ## run the test suite against a real embedded broker
	$(BIN)/python -m pytest -q --durations=25 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy schemas streaming ingest trainer serving streamlearn benchmarks

$(VENV)/.bench-installed: $(STAMP) requirements-bench.lock
	$(BIN)/python -m pip install -q --no-deps -r requirements-bench.lock  # see the lock: quixstreams caps pydantic
	touch $@

bench: $(VENV)/.bench-installed ## run every benchmark; JSON + markdown table under reports/bench/
	$(BIN)/python -m benchmarks.run_all

clean: ## remove the virtualenv and local state
	rm -rf $(VENV) .streamlearn reports .pytest_cache .mypy_cache .ruff_cache
