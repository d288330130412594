# The two commands: `make demo` (the main job) and `make test` (what CI runs).
# The virtualenv and the Kafka runtime live in a cache outside the clone, keyed on the
# dependency files, so a second run (or CI on the same machine) reuses them.
PYTHON ?= python3
export SLUICE_CACHE_DIR ?= $(HOME)/.cache/sluice
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
VENV := $(SLUICE_CACHE_DIR)/venv-$(DEPS_HASH)
BIN := $(VENV)/bin
SLUICE := $(BIN)/python -m pipeline.cli
export PYTHONPATH := $(CURDIR)

.PHONY: demo test unit integration lint fmt setup sysdeps kafka-runtime deploy-tools deploy-check clean-cache

demo: setup
	$(SLUICE) demo

test: setup deploy-tools lint
	$(BIN)/python -m pytest tests

unit: setup deploy-tools
	$(BIN)/python -m pytest tests/unit

integration: setup deploy-tools
	$(BIN)/python -m pytest tests/integration

lint: $(VENV)/.ok
	$(BIN)/ruff check pipeline agents benchmarks tests
	$(BIN)/ruff format --check pipeline agents benchmarks tests
	$(BIN)/mypy pipeline agents benchmarks

fmt: $(VENV)/.ok
	$(BIN)/ruff format pipeline agents benchmarks tests
	$(BIN)/ruff check --fix pipeline agents benchmarks tests

setup: $(VENV)/.ok sysdeps kafka-runtime
	@$(BIN)/pip install -q --no-deps --no-build-isolation -e . >/dev/null

# No file prerequisite: the folder's name is keyed on pyproject.toml's content, so a fresh
# clone (new mtimes) reuses the venv and a changed dependency list builds a new one.
$(VENV)/.ok:
	rm -rf $(SLUICE_CACHE_DIR)/venv-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.txt
	touch $@

# Debian packages: kcat (a third-party Kafka client for the end-to-end test); Java and Maven
# fetch and run the broker; prometheus (and its promtool) scrapes a worker and unit-tests the
# alert rules; chromium and chromium-driver load the worker's dashboard page in a test;
# redis-server is the networked cold feature source in the cache tests; openssl makes the
# secured broker's certificates.
sysdeps:
	@command -v kcat >/dev/null && command -v java >/dev/null && command -v mvn >/dev/null \
		&& command -v prometheus >/dev/null && command -v promtool >/dev/null \
		&& command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		&& command -v redis-server >/dev/null && command -v openssl >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			kcat default-jre-headless maven prometheus chromium chromium-driver redis-server \
			openssl >/dev/null; }

kafka-runtime: $(VENV)/.ok
	@$(SLUICE) broker fetch >/dev/null

# helm and the KEDA / Prometheus Operator CRDs that check deploy/ offline (cached; helm is
# built with Go from the Go module proxy the first time, a few minutes).
deploy-tools:
	@bash deploy/tools.sh >/dev/null

# Render the chart and validate every resource (also part of `make test`).
deploy-check: setup deploy-tools
	$(BIN)/python -m pytest tests/unit/test_deploy.py

clean-cache:
	rm -rf $(SLUICE_CACHE_DIR)
