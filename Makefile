# The two commands of the README: `make demo` and `make test` (`make test-fast` skips the slow tests). Each creates .venv
# when missing and installs the project into it, so a fresh clone needs nothing else.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build that lies on this machine's disk; GPU users: make TORCH_SPEC="torch" (see README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test test-fast bench clean browser-deps

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(PIP_QUIET)
	$(PY) -m pip install -q -e ".[dev,saelens]" $(PIP_QUIET)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/revelio demo

# tests/test_browser.py drives Debian's chromium headless; install it when missing (as root, as CI runs).
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "chromium could not be installed: tests/test_browser.py will be skipped"; \
	  else echo "no chromium + chromedriver and no root apt-get: tests/test_browser.py will be skipped"; fi; fi

test: $(STAMP) browser-deps
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

# The edit loop: everything but the tests marked slow (whole demo, notebooks, real subprocesses, training).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; HF_HUB_OFFLINE=1 $(PY) -P $$b; done

clean:
	rm -rf $(VENV) runs .pytest_cache
