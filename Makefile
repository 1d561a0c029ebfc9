# Two entry points do everything on a fresh machine:
#   make demo   - create .venv if missing, run the MovieLens-100K pipeline end to end
#   make test   - create .venv if missing, run the test suite
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GLOO_SOCKET_IFNAME ?= lo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch first with the matching CPU fbgemm (fbgemm-gpu-cpu); torchrec --no-deps so
# pip never pulls the 2.7 GB CUDA fbgemm-gpu. The pins live in sidrank/envcheck.py.
$(STAMP): requirements.txt pyproject.toml sidrank/envcheck.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $$($(BIN)/python sidrank/envcheck.py --pins torch)
	$(BIN)/pip install -q --no-deps $$($(BIN)/python sidrank/envcheck.py --pins torchrec)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m sidrank.envcheck
	touch $(STAMP)

demo: venv
	$(BIN)/python -m demo

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m benchmarks.auc

clean:
	rm -rf artifacts feature_repo/data
