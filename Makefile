# Two entry points that work on a fresh machine (CPU, PyPI only):
#   make demo  - create .venv, install, train a small PixelCNN++ + DLM head on the bundled data
#   make test  - create .venv, install, run the whole test suite
# torch is pinned here (the version our machines hold, as their +cpu build; from PyPI on Linux
# this is the CUDA-enabled wheel, which also runs on CPU); pyproject keeps the loose range.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test docs serve-docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test,docs,train]"
	touch $@

demo: setup
	$(PY) examples/train_cifar10.py

test: setup
	$(PY) -m pytest -q

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

serve-docs: setup
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) site runs .pytest_cache .hypothesis
