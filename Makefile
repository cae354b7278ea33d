# megatron_solo: `make demo` and `make test` are the two commands a newcomer types.
# Everything else here is what they need, created from nothing.

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# python3.12 is required by megatron-core >= 0.17. Use it from PATH if it runs, else pyenv's copy.
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v $$p || echo $$p; } && break; done)
STAMP := $(VENV)/.setup-stamp
PYTEST_ARGS ?=
# pip asks the registry for a newer pip on every call otherwise (the tests' installs into .cache/ included)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test demo bench clean-venv lint

setup: $(STAMP)

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@test -n "$(PYTHON312)" || { echo "error: python3.12 not found (megatron-core needs Python 3.12)"; exit 1; }
	@echo "== [1/4] virtual environment $(VENV) ($(PYTHON312))"
	@test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	@echo "== [2/4] pip itself"
	$(PY) -m pip install --upgrade --progress-bar on pip
	@echo "== [3/4] the pinned dependencies of requirements.txt (torch, megatron-core, transformers ...: a few minutes)"
	@# pip's own byte-compilation stays: with PYTHONDONTWRITEBYTECODE set, a venv without byte-code would compile
	@# its imports in every process, and compileall -j 0 after --no-compile was slower (docs/BENCHMARKS.md 13)
	$(PY) -m pip install --progress-bar on -r requirements.txt
	@echo "== [4/4] this package (editable) and its C++ extension"
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import megatron_solo, megatron_solo._C as c; print('megatron_solo ready, C++ extension', c.__file__)"
	@echo "== setup done: use $(PY) (or 'source $(VENV)/bin/activate') for the commands in README.md and docs/"
	@touch $@

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	bash examples/quickstart.sh

bench: setup
	bash benchmarks/run_all.sh

clean-venv:
	rm -rf $(VENV) build *.egg-info megatron_solo/_C*.so
