# Quick start: `make demo` (set up + one real split fine-tune) and `make test` (set up + test suite).
# Installs come from requirements/lock.txt: the versions the suite last passed with. `make lock` refreshes
# it and says what moved; `make test-latest` runs the suite on the newest releases pyproject.toml allows.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements/lock.txt
PIP_VERSION ?= pip==26.3
# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build on machines without a GPU.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Two workers fit two cores; tests that share a served process or a port stay on one worker (conftest).
PYTEST_WORKERS ?= 2
LATEST ?= .venv-latest

.PHONY: setup demo test test-latest lock clean chromium

# $(1): the venv; $(2): pip's extra arguments for the project (the lock's constraint, or none).
define install
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q -U "$(PIP_VERSION)"
	$(1)/bin/pip install -q "$(TORCH)" $(2) || $(1)/bin/pip install -q "$(TORCH)" --index-url $(TORCH_INDEX)
	$(1)/bin/pip install -q $(2) -e ".[test]"
endef

$(BIN)/splittune: pyproject.toml $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $@

setup: $(BIN)/splittune

demo: setup
	$(BIN)/splittune train --out runs/demo
	$(BIN)/splittune generate runs/demo --prompt "ROMEO. O, she doth teach the torches" --max-new-tokens 40 --compare-base --temperature 0.8 --top-p 0.95 --seed 1

# The dashboards' tests drive headless Chromium (Debian's chromium): installed when absent (as root; apt's index is
# refreshed only when the package is unknown); without root, the tests say what is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; }; } || \
	  echo "make: chromium is not installed and cannot be here (not root): the dashboard tests will fail until it is"

test: setup chromium
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# The newest releases pyproject.toml allows, in a venv of their own: drift found on purpose, not by users.
test-latest: chromium
	rm -rf $(LATEST)
	$(call install,$(LATEST),--upgrade --upgrade-strategy eager -c requirements/torch.txt)
	$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# Re-resolve the lock to the newest allowed releases and print what moved.
lock: setup
	$(BIN)/pip install -q pip-tools
	cp $(LOCK) $(LOCK).old
	$(BIN)/pip-compile -q --upgrade pyproject.toml --extra test --strip-extras --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links -c requirements/torch.txt -o $(LOCK)
	$(BIN)/python requirements/moved.py $(LOCK).old $(LOCK)
	rm $(LOCK).old

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
