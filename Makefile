# The two commands: `make serve` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup model serve test bench clean

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

test: model
	$(PY) -m pytest -q

bench: model
	$(VENV)/bin/rlserve bench offline --backend both

clean:
	rm -rf $(VENV) build *.egg-info
