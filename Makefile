# rulecheck: `make demo` runs the main job on the bundled model, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Python caches compiled modules, and pytest the modules it rewrites for its assertions (the
# tests, and every module of a package that ships a pytest plugin: rulecheck, hypothesis, ...):
# with PYTHONDONTWRITEBYTECODE set, each test process parses and rewrites ~580 modules again
unexport PYTHONDONTWRITEBYTECODE
# glibc hands a freed block of 128 KiB or more back to the system, and the next batch's tensor
# of the same size is faulted in again, page by page: blocks below 32 MiB taken from the heap,
# and freed heap kept for reuse, halve the page faults of `make test` (7.4 to 3.4 million, a
# quarter of its system time). Both are needed: a trim threshold alone maps every block.
export MALLOC_MMAP_THRESHOLD_ = 33554432
export MALLOC_TRIM_THRESHOLD_ = 1073741824

.PHONY: install demo test fuzz bench bench-scale lint clean

install: $(STAMP)

# torch is pinned first so that pip takes the CPU build on disk, not the CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# the main job: extract every head of the bundled model (or of MODEL, e.g. MODEL=planted-rotary),
# run the rulebooks as tests (writing the HTML report), summarise, and say where the report is
MODEL ?= rulecheck-tiny
demo: install
	$(VENV)/bin/rulecheck extract --model $(MODEL) --features 25 --out build/demo
	$(PY) -m pytest build/demo -q -n 2 --dist loadfile --rulecheck-html build/demo/report.html \
		--rulecheck-report build/demo/run.json
	$(VENV)/bin/rulecheck summary build/demo
	@echo "report: $(CURDIR)/build/demo/report.html"

test: install
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q

# the property tests of options, loaders and the YAML writer at 10,000 examples each
# (make test runs a few dozen)
fuzz: install
	RULECHECK_FUZZ_EXAMPLES=10000 $(PY) -m pytest -n 2 -q \
		tests/test_bad_input.py tests/test_fuzz_loaders.py tests/test_rulebook.py \
		tests/test_roundtrip.py \
		-k "parsing or fuzz or bytes or mutations or arrays"

bench: install
	$(PY) -m benchmarks.run

# how extraction grows with heads, features and corpus on a synthetic GPT-2-shaped layer
# (about 12 minutes on 2 cores; add ARGS=--full on a GPU)
bench-scale: install
	$(PY) -m benchmarks.scale $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf build .rulecheck_cache
