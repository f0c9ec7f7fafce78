# Two commands matter: `make build-dataset` and `make test`. Everything sets itself up on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INPUT ?= samples
OUTPUT ?= out/dataset
CONFIG ?=
ARGS ?=
space := $(subst ,, )
comma := ,
# Extras the build needs, from the config: SAM segmenters, the vLLM client, transformers, the
# consistency filter (torch, open_clip: the train extra).
BUILD_EXTRAS := $(strip $(if $(CONFIG),$(shell grep -qsE 'name: *sam-' $(CONFIG) && echo sam),)\
  $(if $(CONFIG),$(shell grep -qsE 'name: *vllm' $(CONFIG) && echo vllm),)\
  $(if $(CONFIG),$(shell grep -qsE 'name: *transformers' $(CONFIG) && echo hf),)\
  $(if $(CONFIG),$(shell grep -qsE '^consistency:' $(CONFIG) && echo train),))
BUILD_STAMP := $(VENV)/.stamp-$(if $(BUILD_EXTRAS),$(subst $(space),-,$(BUILD_EXTRAS)),core)

.PHONY: build-dataset validate test test-quick test-all venv vllm-env schema-doc bench gpu-wheels clean help

help:
	@echo "make build-dataset [INPUT=dir|glob|manifest|tars|samples|synthetic://N] [OUTPUT=dir] [CONFIG=yaml] [ARGS='beam flags']"
	@echo "make validate OUTPUT=dir     check a built dataset against the schema"
	@echo "make eval-annotators [CONFIG=yaml] [N=200] [HARD=1]  score the annotators on synthetic scenes"
	@echo "make recaption FROM=dataset CONFIG=yaml OUTPUT=dir [RETRY=permanent]  recompute only what new settings change"
	@echo "make test                    the test suite (what CI runs)"

$(VENV)/.stamp-%: setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) [$*] (first use only)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".$(if $(filter core,$*),,[$(subst -,$(comma),$*)])"
	@touch $@

venv: $(VENV)/.stamp-core

# A config that manages the tiny CPU vLLM server needs that server's own environment.
BUILD_SERVER := $(if $(CONFIG),$(shell grep -qs 'tools/vllm_cpu' $(CONFIG) && echo vllm-env),)

build-dataset: $(BUILD_STAMP) $(BUILD_SERVER)
	$(PY) -m pipelines.build_dataset --input '$(INPUT)' --output '$(OUTPUT)' $(if $(CONFIG),--config '$(CONFIG)') $(ARGS)

validate: $(VENV)/.stamp-core
	$(PY) -m pipelines.validate '$(OUTPUT)'

schema-doc: $(VENV)/.stamp-core
	$(PY) -m schemas.doc

# The test venv has the test and sam extras; the vLLM server gets its own venv (vllm-env).
$(VENV)/.stamp-all: setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,sam,vllm,hf,train]"
	@touch $@ $(VENV)/.stamp-core $(VENV)/.stamp-sam $(VENV)/.stamp-test $(VENV)/.stamp-hf $(VENV)/.stamp-vllm $(VENV)/.stamp-train

vllm-env:
	bash tools/vllm_cpu/setup.sh

test: $(VENV)/.stamp-all
	$(PY) -m pytest -q

test-quick: $(VENV)/.stamp-all
	$(PY) -m pytest -q -m "not slow and not integration"

bench: $(VENV)/.stamp-all
	$(PY) bench/run_all.py

gpu-wheels:
	bash bench/gpu_wheels.sh .whl

clean:
	rm -rf out .pytest_cache

# The build on Beam's portable runner with SDK_WORKERS external SDK worker processes (the
# execution model of Flink, Spark and Dataflow Runner v2): tools/portable_run.py starts a worker
# pool on a free port, runs the build against it and always stops the pool and its workers.
SDK_WORKERS ?= 2
.PHONY: build-dataset-portable
build-dataset-portable: $(BUILD_STAMP) $(BUILD_SERVER)
	$(PY) tools/portable_run.py --sdk-workers $(SDK_WORKERS) -- --input '$(INPUT)' --output '$(OUTPUT)' $(if $(CONFIG),--config '$(CONFIG)') $(ARGS)

# A look at a built dataset: OUTPUT/preview/index.html (one offline page) and PNG contact sheets
# of N sampled images with their masks, boxes, region tree, texts and visual prompts.
N ?= 48
.PHONY: preview
preview: $(VENV)/.stamp-core
	$(PY) -m pipelines.preview '$(OUTPUT)' --n $(N)

# COCO instances JSON per split (+ the images) of a built dataset, in OUTPUT/coco/:
# LEVEL=pixel (masks, default), region (boxes) or all (both, parents linked).
LEVEL ?= pixel
.PHONY: export-coco
export-coco: $(VENV)/.stamp-core
	$(PY) -m pipelines.export_coco '$(OUTPUT)' --level $(LEVEL)

# Train RegionCLIP on built shards (README, "Training"): DATA = a dataset folder, shard paths,
# a glob or {a..b} list, or URLs; CONFIG = trainer YAML (default: the tiny CPU config); OUTPUT =
# run folder (default out/train). Rerunning the same command resumes from its last checkpoint.
# NPROC=N starts N processes with torchrun (DDP); DEVICE = auto | cpu | cuda.
DATA ?= out/dataset
NPROC ?= 1
DEVICE ?= auto
TRAIN_OUTPUT = $(if $(filter command line environment,$(origin OUTPUT)),$(OUTPUT),out/train)
TRAIN_LAUNCH = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC),$(PY))
.PHONY: train
train: $(VENV)/.stamp-train
	$(TRAIN_LAUNCH) -m trainer.train --data $(DATA) --config '$(or $(CONFIG),configs/tiny-train.yaml)' --output '$(TRAIN_OUTPUT)' --device $(DEVICE) $(ARGS)

# Score the configured segmenter and captioner on N synthetic scenes with known answers (README,
# "Scoring annotators"): masks, hierarchy, caption words. HARD=1: textured, occluded, nested
# scenes on photographs. The report goes to out/eval/<config name>[-hard].json and is printed.
EVAL_N = $(if $(filter command line environment,$(origin N)),$(N),200)
.PHONY: eval-annotators
eval-annotators: $(BUILD_STAMP) $(BUILD_SERVER)
	$(PY) -m pipelines.eval_annotators $(if $(CONFIG),--config '$(CONFIG)') --n $(EVAL_N) $(if $(HARD),--hard) $(ARGS)

# Re-caption / re-segment an existing dataset with new settings: only what they change is asked
# again, the rest is carried over byte for byte (README, "Re-captioning"). RETRY=permanent also
# asks again the regions FROM lost to permanent failures. Report: OUTPUT/recaption_report.json.
.PHONY: recaption
recaption: $(BUILD_STAMP) $(BUILD_SERVER)
	@test -n "$(FROM)" || { echo "usage: make recaption FROM=<dataset> CONFIG=<new settings> OUTPUT=<new dataset>"; exit 2; }
	$(PY) -m pipelines.recaption --from '$(FROM)' --output '$(OUTPUT)' $(if $(CONFIG),--config '$(CONFIG)') $(if $(RETRY),--retry-failed $(RETRY)) $(ARGS)
