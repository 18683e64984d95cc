# zerotrain — a newcomer's targets: setup, demo, test, lint, bench, generate.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every pip call goes through the constraints file: it pins torch to the CPU
# wheel so nothing can pull a multi-GB CUDA build (README: "GPU builds").
CONSTRAINTS ?= constraints.txt
PIP := $(PY) -m pip install --constraint $(CONSTRAINTS)
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint typecheck bench generate clean prometheus

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	@echo "setup: installing zerotrain into $(VENV)/ with torch (CPU), Ray, gRPC, DeepSpeed, matplotlib and the dev tools; about 3-4 minutes the first time"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e '.[dev,deepspeed,plot]'
	touch $(STAMP)

generate: setup
	$(PY) -m zerotrain.service.api.generate

lint: setup
	$(PY) -m ruff check .

# mypy does not follow the editable install's import hook: it reads the sources
# through .mypy_src/zerotrain/, two symlinks (git-ignored).
typecheck: setup
	mkdir -p .mypy_src/zerotrain
	ln -sfn ../../optim .mypy_src/zerotrain/optim
	ln -sfn ../../service .mypy_src/zerotrain/service
	MYPYPATH=.mypy_src $(PY) -m mypy -p zerotrain.optim -p zerotrain.service

# Every run ends with the skip reasons and the 15 slowest tests. -P keeps the
# checkout's root off sys.path: the code is importable only as zerotrain.*.
PYTEST := $(PY) -P -m pytest -rs --durations=15

# Two pytest workers, whole files each (a file's fixtures are set up once); each
# worker starts its own Ray head. Measured on 2 cores: 10:39 against 13:23 with
# every Ray test on one worker and 13:59 serial (README, Development).
test: setup lint prometheus
	$(PYTEST) -n 2 --dist loadfile

# The edit-test loop: everything but the tests that start a Ray cluster or a
# service subprocess (marked `ray`); multi-process gloo tests included.
test-fast: setup lint prometheus
	$(PYTEST) -m "not ray" -n 2

demo: setup
	$(PY) -m zerotrain.service.demo

# Each benchmark prints a table and writes bench/results/<name>.json; the
# recorded numbers live in docs/BENCHMARKS.md.
BENCHES := optim_step zero_train runtime_engines api_latency service_load metrics_overhead
bench: setup
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

# On a machine with CUDA GPUs (and a CUDA build of torch, README "GPU builds"):
# parity with torch.optim, step timing, ZeroOptimizer on NCCL, a use_gpu job
# through the service, in under 8 minutes on one GPU; bench/results/gpu_check.json.
# Exit 2 without a GPU. GPU_CHECK_ARGS="--world all" uses every GPU;
# bench/gpu_check.py --device cpu is the CPU smoke mode.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# promtool + prometheus for the observability tests: Debian's package, unpacked
# into a project-local folder (no root install needed; idempotent). Skipped when
# promtool and prometheus are already on PATH. Without network access apt gives
# up after a bounded wait and this target fails naming what is missing.
PROM_DIR := .prometheus
APT_BOUNDED := -o Acquire::http::Timeout=15 -o Acquire::https::Timeout=15 -o Acquire::Retries=1
prometheus: $(PROM_DIR)/usr/bin/promtool

$(PROM_DIR)/usr/bin/promtool:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then \
		echo "prometheus: using $$(command -v promtool)"; exit 0; fi; \
	echo "prometheus: fetching Debian's prometheus package into $(PROM_DIR)/ (promtool and prometheus, for the tests)"; \
	rm -rf $(PROM_DIR).tmp && mkdir -p $(PROM_DIR).tmp && \
	if ! (cd $(PROM_DIR).tmp && (apt-get $(APT_BOUNDED) download prometheus 2>/dev/null \
		|| (apt-get $(APT_BOUNDED) update -qq && apt-get $(APT_BOUNDED) download prometheus))); then \
		rm -rf $(PROM_DIR).tmp; \
		echo "prometheus: could not download Debian's 'prometheus' package (no network or no apt?)." >&2; \
		echo "  The tests need 'promtool' and 'prometheus': put both on PATH, or rerun with network access." >&2; \
		exit 1; fi && \
	dpkg-deb -x $(PROM_DIR).tmp/prometheus_*.deb $(PROM_DIR).tmp/root && \
	rm -rf $(PROM_DIR) && mv $(PROM_DIR).tmp/root $(PROM_DIR) && rm -rf $(PROM_DIR).tmp && \
	$(PROM_DIR)/usr/bin/promtool --version | head -1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .mypy_src
