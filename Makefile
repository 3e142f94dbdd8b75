# Two entry points: `make demo` (the main job on synthetic data) and `make test`.
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the project into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m training demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# The benchmark suite on a trained edge run and its bundle (Br35H; see benchmarks/suite.py).
BENCH_RUN ?= runs/br35h-edge-ft
BENCH_BUNDLE ?= bundles/br35h-edge-ft
BENCH_OUT ?= benchmarks/results/bench-edge
bench: $(STAMP)
	@test -d $(BENCH_RUN) -a -d $(BENCH_BUNDLE) || { echo "make bench needs a trained run $(BENCH_RUN) and its bundle $(BENCH_BUNDLE) (see README: Benchmarks)"; exit 2; }
	$(PY) -m benchmarks.suite --run $(BENCH_RUN) --bundle $(BENCH_BUNDLE) --out $(BENCH_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check training runtime export benchmarks tests

clean:
	rm -rf runs/demo .pytest_cache
