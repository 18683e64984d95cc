# zerotrain — a newcomer's targets: setup, demo, test, lint, bench, generate.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every pip call goes through the constraints file: it pins torch to the CPU
# wheel so nothing can pull a multi-GB CUDA build (README: "GPU builds").
CONSTRAINTS ?= constraints.txt
PIP := $(PY) -m pip install --constraint $(CONSTRAINTS)
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench generate clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e '.[dev,deepspeed]'
	touch $(STAMP)

generate: setup
	$(PY) -m service.api.generate

lint: setup
	$(PY) -m ruff check .

typecheck: setup
	$(PY) -m mypy optim service

test: setup lint
	$(PY) -m pytest -q

demo: setup
	$(PY) -m service.demo

bench: setup
	$(PY) bench/optim_step.py
	$(PY) bench/zero_train.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
