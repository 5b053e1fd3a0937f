# Two entry points that work on a fresh machine (CPU, PyPI only):
#   make demo  - create .venv, install, train a small PixelCNN++ + DLM head on the bundled data
#   make test  - create .venv, install, run the whole test suite
# torch is pinned here (the version our machines hold, as their +cpu build; from PyPI on Linux
# this is the CUDA-enabled wheel, which also runs on CPU); pyproject keeps the loose range.
# Each target installs only the extras it needs, once: demo the train extra (tqdm), docs the
# docs extra, test all three (the suite builds the docs site and runs the examples).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test docs serve-docs clean

setup: $(VENV)/.installed-test

# The venv and the pinned torch, shared by every extra set below.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[train]"
	touch $@

$(VENV)/.installed-docs: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[test,docs,train]"
	touch $@ $(VENV)/.installed-demo $(VENV)/.installed-docs

demo: $(VENV)/.installed-demo
	$(PY) examples/train_cifar10.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

serve-docs: $(VENV)/.installed-docs
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) site runs .pytest_cache .hypothesis
