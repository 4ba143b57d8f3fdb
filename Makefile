# procfleet — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEB_PACKAGES := prometheus prometheus-process-exporter wrk openssl
# Two stamps: `make run` needs only the package; `make test`, `lint` and `bench` add the test
# tools (pytest, ruff, schemathesis, ...), which take most of the install time.
RUN_STAMP := $(VENV)/.run-deps
TEST_STAMP := $(VENV)/.test-deps
EXPORTER_PORT ?= 9256
QUERY_PORT ?= 8080

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets with one line each
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "  Variables: PYTHON=$(PYTHON) (Python >= 3.11), EXPORTER_PORT=$(EXPORTER_PORT), QUERY_PORT=$(QUERY_PORT)"

$(RUN_STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	$(PIP) install -q -e '.[test]'
	touch $(TEST_STAMP)

.PHONY: install
install: $(TEST_STAMP) ## Make .venv and install procfleet with its test tools

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
run: $(RUN_STAMP) ## Run an exporter and the query service here (EXPORTER_PORT=, QUERY_PORT= to move them)
	$(PY) -m procfleet.runlocal --exporter-port $(EXPORTER_PORT) --query-port $(QUERY_PORT)

.PHONY: test
test: $(TEST_STAMP) lint debs ## Lint, then run the whole test suite (fails when anything fails)
	$(PY) -m pytest -q

.PHONY: lint
lint: $(TEST_STAMP) ## ruff over the code, then mypy --strict over the packages
	$(VENV)/bin/ruff check procfleet exporter query tests bench setup.py
	$(VENV)/bin/mypy

.PHONY: bench
bench: $(TEST_STAMP) debs ## Run the benchmarks under bench/ (writes bench/results/)
	$(PY) bench/run_all.py

.PHONY: dist
dist: $(TEST_STAMP) ## Build a wheel and an sdist into dist/ (offline: the venv's setuptools)
	$(PY) -m build --no-isolation --wheel --sdist --outdir dist .

.PHONY: clean
clean: ## Remove the venv and caches
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache build dist
