# pyrestserver developer targets.
#
#   make test     create .venv (if missing), install .[dev], make sure restic and
#                 apache2-utils are installed, run the test suite
#   make lint     ruff check
#   make zipapp   build pyrestserver.pyz (run it with: python3 pyrestserver.pyz --path ...)
#   make bench    pyrestserver against rclone serve restic (BENCH_ARGS="--scale full")
#   make clean    remove build output (make distclean also removes .venv)
#
# Variables: PYTHON (interpreter used to create .venv, default python3),
#            PYTEST_ARGS (extra pytest arguments, e.g. PYTEST_ARGS="-k e2e -x").

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=
ZIPAPP := pyrestserver.pyz
ZIPSTAGE := build/zipapp

SHELL := /bin/bash

.PHONY: test lint bench zipapp clean distclean venv system-deps

test: $(STAMP) system-deps
	$(VPY) -m pytest -q $(PYTEST_ARGS)

venv: $(STAMP)

# Re-install only when pyproject.toml changes (or the venv is new).
$(STAMP): pyproject.toml
	@if [ ! -x $(VPY) ]; then \
	  echo "creating $(VENV) with $(PYTHON)"; \
	  if ! $(PYTHON) -m venv $(VENV); then \
	    rm -rf $(VENV); \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "installing python3-venv"; \
	      DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
	      $(PYTHON) -m venv $(VENV) || exit 1; \
	    else \
	      echo "error: '$(PYTHON) -m venv' failed; install the venv module (Debian: apt-get install python3-venv)" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	fi
	$(VPY) -m pip install -q -e '.[dev]'
	@touch $@

# restic (end-to-end tests) and htpasswd from apache2-utils (auth tests).
system-deps:
	@missing=""; \
	command -v restic >/dev/null || missing="$$missing restic"; \
	command -v htpasswd >/dev/null || missing="$$missing apache2-utils"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || exit 1; \
	  else \
	    echo "error: missing$$missing; install them first (Debian/Ubuntu: sudo apt-get install$$missing)" >&2; \
	    exit 1; \
	  fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

BENCH_ARGS ?=
bench: $(STAMP)
	$(VPY) bench/run.py $(BENCH_ARGS)

# A single-file executable archive: pyrestserver.py plus a __main__.py.
# The optional companion modules are included when they exist.
zipapp: $(ZIPAPP)

$(ZIPAPP): pyrestserver.py $(wildcard pyrestserver_drime.py pyrestserver_s3.py)
	rm -rf $(ZIPSTAGE)
	mkdir -p $(ZIPSTAGE)
	cp $^ $(ZIPSTAGE)/
	printf '%s\n' \
	  'import sys' \
	  'import pyrestserver' \
	  '' \
	  'sys.exit(pyrestserver.main())' > $(ZIPSTAGE)/__main__.py
	$(PYTHON) -m zipapp $(ZIPSTAGE) -o $@ -p '/usr/bin/env python3'
	@echo "built $@ (run: python3 $@ --path /tmp/restic --no-auth)"

clean:
	rm -rf build dist *.egg-info $(ZIPAPP) .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .venv-*
