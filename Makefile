# Two commands for a newcomer: `make serve` (demo server, random tiny model) and `make test`.

# The first of these that runs, is Python 3.11 or newer and can make a venv (a pyenv shim of a version that
# is not installed fails to run, a Debian python without python3-venv lacks ensurepip: both are skipped); `make PYTHON=/path/to/python ...` picks another. Looked for once, and only
# by the target that creates the venv.
PYTHONS := python3.13 python3.12 python3.11 python3
NEW_ENOUGH := -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))'
ifeq ($(origin PYTHON),undefined)
PYTHON = $(eval PYTHON := $(firstword $(foreach p,$(PYTHONS),$(shell $(p) $(NEW_ENOUGH) >/dev/null 2>&1 && echo $(p)))))$(PYTHON)
endif
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# CPU wheels of torch; a GPU machine installs its own CUDA build (see the Dockerfile).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint format typecheck bench clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "need Python 3.11 or newer with venv: none of $(PYTHONS) is one (or: make PYTHON=/path/to/python ...)"; exit 1; }
	@$(PYTHON) $(NEW_ENOUGH) >/dev/null 2>&1 || { echo "need Python 3.11 or newer with venv: $(PYTHON) does not run, is older or lacks venv/ensurepip"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	# torch alone from the CPU index (no retries: an unreachable index must not stall every lookup);
	# its own dependencies then come with the project from the default index. silero-vad (the speech
	# detector) is installed without extras: it needs only torch, which this step already satisfies.
	$(BIN)/python -m pip install --quiet --no-deps --retries 0 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/voxtral-server serve --model tiny --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format app tests bench
	$(BIN)/ruff check --fix app tests bench

bench: install
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
