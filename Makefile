# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, run the four protocol notebooks on the embedded demo data
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
# torch first, pinned: an unpinned torch pulls the newest build (several GB of CUDA packages)
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=
DEVICE ?= cuda

.PHONY: install demo test test-all bench gpu-check wheel-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	MPLBACKEND=agg $(BIN)/scgpt-protocol run params/demo --run-dir $(RUN_DIR)

test: $(STAMP)
	MPLBACKEND=agg $(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	MPLBACKEND=agg $(BIN)/python -m pytest --slow $(PYTEST_ARGS)

# the protocol from a plain pip install: wheel into a fresh venv, init + run ci outside the clone (CI runs it)
wheel-smoke: $(STAMP)
	.ci/wheel_smoke

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_embed.py

# parity, bf16/fp16 embed + predict, AMP training of every strategy, fused attention, full-size figures
gpu-check: $(STAMP)
	MPLBACKEND=agg $(BIN)/python benchmarks/gpu_check.py --device $(DEVICE)

clean:
	rm -rf $(VENV) runs .pytest_cache
