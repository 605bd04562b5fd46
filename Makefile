# Quick start: `make demo` (set up + one real split fine-tune) and `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build on machines without a GPU.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test clean

$(BIN)/splittune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q "$(TORCH)" --index-url $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/splittune

demo: setup
	$(BIN)/splittune train --out runs/demo
	$(BIN)/splittune generate runs/demo --prompt "ROMEO. O, she doth teach the torches" --max-new-tokens 40

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
