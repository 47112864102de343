# Two entry points that do all set-up on a fresh machine:
#   make demo   -> create .venv, install, run the demo
#   make test   -> create .venv if missing, run the whole suite
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-full lint format bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel, not a multi-GB CUDA build
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements-dev.txt
	# DeepSpeed is a test oracle only (layouts, schedules): pure-Python build, no CUDA ops.
	# 0.19.6 is the last release that still has sparse_attention.
	DS_BUILD_OPS=0 $(VPY) -m pip install -q deepspeed==0.19.6
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py

test: $(STAMP)
	$(VPY) -m ruff check src tests benchmarks examples
	$(VPY) -m ruff format --check src tests benchmarks examples
	TRITON_INTERPRET=1 $(VPY) -m pytest -n 2 -q tests $(PYTEST_ARGS)
	$(VPY) -m benchmarks.smoke

test-full: $(STAMP)
	TRITON_INTERPRET=1 FASTLAYERS_TEST_FULL=1 $(VPY) -m pytest -n 2 -q tests -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VPY) -m ruff check src tests benchmarks examples
	$(VPY) -m ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(VPY) -m ruff format src tests benchmarks examples
	$(VPY) -m ruff check --fix src tests benchmarks examples

bench: $(STAMP)
	$(VPY) -m fastlayers.cli bench all

clean:
	rm -rf $(VENV) build dist .pytest_cache
