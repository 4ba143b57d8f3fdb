# procfleet — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEB_PACKAGES := prometheus prometheus-process-exporter wrk
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets with one line each
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Make .venv and install procfleet with its test tools

.PHONY: debs
debs: ## Install the Debian packages tests and benchmarks need (prometheus, promtool, wrk, ...)
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	  $$SUDO systemctl disable --now prometheus prometheus-process-exporter >/dev/null 2>&1 || true; \
	fi

.PHONY: run
run: install ## Run an exporter and the query service on this host with built-in defaults
	$(PY) -m procfleet.runlocal

.PHONY: test
test: lint debs ## Lint, then run the whole test suite (fails when anything fails)
	$(PY) -m pytest -q

.PHONY: lint
lint: install ## ruff over the code
	$(VENV)/bin/ruff check procfleet exporter query tests bench setup.py

.PHONY: bench
bench: install debs ## Run the benchmarks under bench/ (writes bench/results/)
	$(PY) bench/run_all.py

.PHONY: clean
clean: ## Remove the venv and caches
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
