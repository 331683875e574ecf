# ExtremeAug: two commands on a fresh machine.
#   make demo   sets up a virtual environment and runs the annotate-train-correct loop on the phantom
#   make test   sets up the same environment and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test benchmarks clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m ExtremeAugLogic demo

test: setup
	$(PY) -m pytest -q --durations=15 Testing/Python

benchmarks: setup
	$(PY) benchmarks/one_scan.py --set vb --out docs/results/one-scan-vb.md
	$(PY) benchmarks/one_scan.py --set ivd --out docs/results/one-scan-ivd.md

clean:
	rm -rf $(VENV) demo-workspace .pytest_cache
