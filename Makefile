# Each target installs what it needs into .venv first (Python >= 3.11 only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean agents

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/chimera demo $(DEMO_ARGS)

# The test files run on 2 processes (pytest-xdist, a file per worker at a time, so a module's
# shared fixtures stay in one process): about 330 s on the 2-core machine instead of about 580 s
# in one process, which came within seconds of the 10-minute budget. TEST_WORKERS=0 runs
# everything in this process (see README "Tests").
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.installed
	$(PY) -m benchmarks.bench_transport
	$(PY) -m benchmarks.bench_codec
	$(PY) -m benchmarks.bench_footprint
	$(PY) -m benchmarks.bench_consensus
	$(PY) -m benchmarks.bench_wasm
	$(PY) -m benchmarks.bench_aggregation
	$(PY) -m benchmarks.bench_sim

# Rebuild the WASM agents (needs clang, lld, wasi-libc, libclang-rt-14-dev-wasm32);
# tests use the committed builds in agents/wasm.
agents: $(VENV)/.installed
	$(MAKE) -C agents PYTHON=$(abspath $(PY))

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
