# nbloop: two commands on a fresh machine.
#   make demo   set everything up, then train the digits model in the terminal
#   make test   set everything up, then run every test
# VENV=/path/to/env uses another environment (its PyTorch, CPU or CUDA, is kept).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nbloop-setup
# Installed only where the environment has no torch. On this project's machines this is a CPU build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test lab export readme docs tutorials browser check-sync clean bench

setup: $(STAMP)

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/python -m nbloop.demo

lab: setup
	$(BIN)/jupyter lab --ip=127.0.0.1 --notebook-dir=nbs/tutorials $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

export: setup
	$(BIN)/nbdev_export

# The browser check needs Debian's Chromium (playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The library must be exactly what the notebooks export.
check-sync: setup
	$(BIN)/nbdev_export
	@git diff --exit-code --stat -- nbloop || { echo 'nbloop/ differs from what the notebooks export: run nbdev_export and commit'; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- nbloop)" || { git status --short -- nbloop; echo 'nbdev_export made files that are not committed'; exit 1; }

test: setup browser check-sync
	$(BIN)/python -m pytest $(PYTEST_ARGS)

readme: setup
	@if command -v quarto >/dev/null; then $(BIN)/nbdev_readme; \
	else $(BIN)/python tools/readme.py; fi

# The site, from executed notebooks (tools/docs.py): rendered by Quarto where it is installed, by smalldocs otherwise.
docs: setup
	$(BIN)/python tools/docs.py

# Run the tutorials and store their outputs in nbs/tutorials/ (commit them), then build the site.
tutorials: setup
	$(BIN)/python tools/docs.py --write-back

# The loop's own cost against hand-written loops: one process, then torchrun with 2 processes (ratios; a few minutes).
bench: setup
	$(BIN)/python benchmarks/overhead.py && $(BIN)/python benchmarks/ddp.py

clean:
	rm -rf _docs _proc _build _site .pytest_cache tests/artifacts

# On a machine with a CUDA GPU: the CUDA tests and the GPU benchmark in this environment (its PyTorch must see the
# GPU; without one the tests skip and the benchmark runs tiny sizes on the CPU). Where nothing can be installed,
# `bash tools/gpu_check.sh` does the same with python3 and the wheels carried in .whl/.
.PHONY: gpu-check
gpu-check: setup
	@CUBLAS_WORKSPACE_CONFIG=:4096:8 $(BIN)/python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_attacks_metrics.py; t=$$?; \
	$(BIN)/python benchmarks/gpu.py; b=$$?; \
	echo "gpu-check: tests exit status $$t, benchmark exit status $$b"; exit $$(( t || b ))
