# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, run the four protocol notebooks on the embedded demo data
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
# torch first, pinned: an unpinned torch pulls the newest build (several GB of CUDA packages)
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested dependency set of this Python (exact versions CI ran with): make install, .ci/run and
# environment.yml install with it. None for this Python: the ranges of pyproject.toml, with a note.
# CONSTRAINTS= (empty) installs without it, e.g. with another TORCH_SPEC.
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CONSTRAINTS ?= constraints/py$(PYVER).txt
PIP_C := $(if $(and $(CONSTRAINTS),$(wildcard $(CONSTRAINTS))),-c $(CONSTRAINTS),)
# make test-latest: the newest releases pyproject.toml allows, in their own venv, through the real-size smoke
LATEST := .venv-latest
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=
DEVICE ?= cuda

.PHONY: install demo test test-all test-realsize test-latest constraints bench gpu-check wheel-smoke docs clean

$(STAMP): pyproject.toml $(wildcard $(CONSTRAINTS))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(if $(PIP_C),echo "installing the tested set $(CONSTRAINTS)",$(if $(CONSTRAINTS),echo "no tested set for Python $(PYVER) ($(CONSTRAINTS) is missing): the newest releases pyproject.toml allows",echo "CONSTRAINTS is empty: the newest releases pyproject.toml allows"))
	$(BIN)/python -m pip install -q $(PIP_C) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(PIP_C) -e '.[dev,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	MPLBACKEND=agg $(BIN)/scgpt-protocol run params/demo --run-dir $(RUN_DIR)

test: $(STAMP)
	MPLBACKEND=agg $(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	MPLBACKEND=agg $(BIN)/python -m pytest --slow $(PYTEST_ARGS)

# the four steps on 25,000 cells x 2,400 genes (made in seconds), past scanpy's small-data shortcuts (CI runs it)
test-realsize: $(STAMP)
	MPLBACKEND=agg $(BIN)/python -m pytest --realsize -m realsize -s $(PYTEST_ARGS)

# before a release, or when a dependency releases: the newest allowed versions (no constraints; torch stays
# TORCH_SPEC) in a fresh $(LATEST), what differs from the tested set, then the real-size smoke and the graphs
# (an atlas's too: pynndescent above 50,000 cells)
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install -q --upgrade -e '.[dev,docs]'
	$(LATEST)/bin/python .ci/constraints.py diff $(CONSTRAINTS)
	MPLBACKEND=agg $(LATEST)/bin/python -m pytest --realsize --slow -s -p no:cacheprovider \
		tests/test_real_size.py tests/test_neighbors.py $(PYTEST_ARGS)

# refresh the tested set: test-latest, then write what passed to $(CONSTRAINTS) (then make test, and commit it)
constraints: test-latest
	$(LATEST)/bin/python .ci/constraints.py write $(CONSTRAINTS)

# the protocol from a plain pip install: wheel into a fresh venv, init + run ci outside the clone (CI runs it)
wheel-smoke: $(STAMP)
	.ci/wheel_smoke

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_embed.py

# parity, bf16/fp16 embed + predict, AMP training of every strategy, fused attention, full-size figures
gpu-check: $(STAMP)
	MPLBACKEND=agg $(BIN)/python benchmarks/gpu_check.py --device $(DEVICE)

# the documentation site in docs/_build/html: offline, every warning an error, from scratch (autodoc cannot see
# an edited docstring in an incremental build). The tutorials are the executed reports of $(RUN_DIR): the demo
# runs first when they are missing (2-3 minutes on 2 cores)
docs: $(STAMP)
	@test -f $(RUN_DIR)/reports/04_zeroshot.ipynb || $(MAKE) demo
	rm -rf docs/_build docs/api docs/tutorials/generated
	SCGPT_DOCS_REPORTS=$(RUN_DIR)/reports MPLBACKEND=agg $(BIN)/python -m sphinx -W --keep-going -E -q \
		-b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache docs/_build docs/api docs/tutorials/generated
