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

test: $(VENV)/.installed
	$(PY) -m pytest -q

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
