# cxrlab — the README's commands. Everything installs into .venv on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONDONTWRITEBYTECODE := 1

# Every install applies the lock (exact versions, transitive ones included: a fresh install is the one the suite
# was green on). pyproject.toml keeps the compatible ranges for people who install cxrlab as a library.
LOCK := requirements.lock
# torch for `make lock` only (the lock pins it for every other target): 2.14.1/0.29.1 lie on local disk on our
# build machines and are a normal PyPI install elsewhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint bench clean lock check-lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# Re-resolve every dependency from pyproject's ranges in a scratch venv and write the lock (then run make test).
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q $(TORCH_PINS)
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^-e'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv
	@echo "wrote $(LOCK); run 'make test' before committing it"

# The venv holds exactly the locked versions (cxrlab itself aside).
check-lock: setup
	diff <(grep -v '^#' $(LOCK) | sort -f) <($(BIN)/pip freeze --all --exclude-editable | grep -v '^-e' | sort -f) \
	  && echo "venv matches $(LOCK)"

demo: setup
	$(BIN)/cxrlab run --demo --out demo-out

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf demo-out runs .pytest_cache .lock-venv
