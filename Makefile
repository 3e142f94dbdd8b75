# Two entry points: `make demo` (the main job on synthetic data) and `make test`.
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the project into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install --quiet --progress-bar off -e '.[train,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m training demo --out runs/demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# report.html is checked in a real headless browser (Debian's chromium); installed here when missing and
# possible, otherwise that one test says why it is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && echo "installing Chromium (Debian package) for the report's browser test" \
	  && apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: Chromium could not be installed; the report's browser test will be skipped"

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
