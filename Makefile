# Two entry points: `make demo` (the main job on synthetic data) and `make test`.
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check training runtime export benchmarks tests

clean:
	rm -rf runs/demo .pytest_cache
