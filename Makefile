# The two commands: `make serve` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup model serve lint test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Take the local CPU build of torch where none is installed; never replace an existing torch.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m rlserve.models.default

serve: model
	$(VENV)/bin/rlserve serve

# Style, unused code and types fail the build before any test runs (the benchmarks folder is linted when present).
lint: setup
	$(VENV)/bin/ruff check rlserve tests $(wildcard benchmarks)
	$(VENV)/bin/mypy

test: lint model
	$(PY) -m pytest -q --durations=25

bench: model
	$(VENV)/bin/rlserve bench offline --backend both

clean:
	rm -rf $(VENV) build *.egg-info
