# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The dashboard's chart library, from npm, served from the package's static folder.
VENDOR := src/gpuscout/dashboard/static/vendor
CHARTS := $(VENDOR)/uPlot.iife.min.js

.PHONY: run test install test-deps lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CHARTS):
	@command -v npm >/dev/null 2>&1 || { echo "npm is needed for the dashboard's charts (apt-get install npm)" >&2; exit 1; }
	@[ -f node_modules/uplot/dist/uPlot.iife.min.js ] || npm install --silent --no-audit --no-fund uplot@1.6 >/dev/null
	mkdir -p $(VENDOR)
	cp node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css node_modules/uplot/LICENSE $(VENDOR)/

install: $(STAMP) $(CHARTS)

## Start the control plane (API, proxy, dashboard) with a demo job that migrates.
run: $(STAMP) $(CHARTS)
	$(BIN)/gpuscout up --demo

## Everything the tests need (apt packages included), then all the tests.
test-deps: $(STAMP) $(CHARTS)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@[ -x node_modules/.bin/s3rver ] || npm install --silent --no-audit --no-fund s3rver@3 >/dev/null
	@# The CPU build that lies on this machine's disk (not in the dev extra: pip would pick a newer CUDA build).
	@$(BIN)/python -c 'from importlib.util import find_spec as f; assert all(map(f, ("torch", "sklearn", "transformers", "accelerate", "lightning")))' 2>/dev/null \
		|| $(BIN)/pip install --quiet torch==2.13.0 scikit-learn transformers accelerate lightning

test: test-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

bench: $(STAMP)
	$(BIN)/python bench/migration.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache $(VENDOR)
