# detr_d2: `make install`, `make test`, `make demo` (and `make pretrain`, which rebuilds the
# checkpoint the demo starts from).
# Everything installs into .venv (Python 3.11) in the repository root. Idempotent: a
# stamp records the install, and it is redone only when setup.py or the installer change.

PYTHON_SYSTEM ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.detr_d2-installed
PIP_NET := --timeout 30 --retries 1
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# pytest-xdist workers of make test / make test-quick, one torch thread each (0: one process)
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile

PRETRAIN_DATA := datasets/shapes_pretrain
PRETRAIN_RUN := output/shapes_detr_pretrain_single_stage
BUNDLED := checkpoints/shapes_detr_tiny.pth
BACKBONE := output/shapes_backbone/backbone.pth
DINO_PRETRAIN_CONFIG := configs/shapes/dino_tiny_pretrain.yaml
DINO_PRETRAIN_RUN := output/shapes_dino_pretrain
DINO_BUNDLED := checkpoints/shapes_dino_tiny.pth

.PHONY: install test test-quick demo demo-masks demo-panoptic demo-dino pretrain pretrain-dino clean-venv

install: $(STAMP)

$(STAMP): setup.py scripts/install_detectron2.py Makefile
	@test -x $(PY) || { echo "[install] creating $(VENV) with $(PYTHON_SYSTEM)"; $(PYTHON_SYSTEM) -m venv $(VENV); }
	@if $(PY) -c "import torch, torchvision" 2>/dev/null; then \
	  echo "[install] torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	else \
	  echo "[install] installing $(TORCH)"; $(PIP) install $(PIP_NET) $(TORCH); \
	fi
	@$(PY) scripts/install_detectron2.py --cache-dir .cache
	@echo "[install] installing detr_d2 (editable) with its dependencies, export and test tools"
	@$(PIP) install -q $(PIP_NET) --no-build-isolation -e '.[test,export]'
	@# LVISEvaluator's lvis API; without its declared opencv-python, which would shadow opencv-python-headless
	@$(PIP) install -q $(PIP_NET) --no-deps lvis==0.5.3
	@# COCOPanopticEvaluator's panopticapi (pq_compute, id2rgb); without its numpy<2 pin (works on numpy 2, tested)
	@$(PIP) install -q $(PIP_NET) --no-deps panopticapi-lite==0.2.0
	@$(PY) -c "import detr_d2, detectron2; print('[install] detr_d2 ready; detectron2', detectron2.__version__, 'from', detectron2.__path__[0])"
	@touch $(STAMP)

# The whole suite (CI's .ci/run); test-quick leaves out the tests marked slow (trainings,
# end-to-end runs, command-line tools in subprocesses; tests/tiers.py, docs/testing.md).
test: install
	$(PY) -m pytest tests $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-quick: install
	$(PY) -m pytest tests -m "not slow" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The embedded demo: fine-tune the bundled checkpoint on a new 2-class set, evaluate, draw.
demo: install
	$(PY) tools/run_demo.py

# After `make demo`: the mask head trained on its frozen fine-tuned detector, segm AP, masks drawn.
demo-masks: install
	$(PY) tools/run_demo.py --masks

# The synthetic panoptic demo: panoptic shapes, boxes then the mask head on the frozen
# detector (from the bundled checkpoint), PQ, panoptic drawings (tools/run_panoptic_demo.py).
demo-panoptic: install
	$(PY) tools/run_panoptic_demo.py

# Rebuild $(BUNDLED) from nothing (about 1 h on 2 CPU cores): the 6-class pretraining
# shapes, the tiny CNN backbone's CenterNet pretraining, then one DETR stage on top
# (configs/shapes/detr_tiny_pretrain_single_stage.yaml: backbone frozen, 16000 iterations),
# then the slim copy. Resumable: an interrupted DETR stage goes on from its last checkpoint.
pretrain: install
	$(PY) datasets/prepare_shapes.py --preset pretrain --splits train:4000,val:200 --output $(PRETRAIN_DATA)
	$(PY) tools/pretrain_backbone.py --dataset-dir $(PRETRAIN_DATA) --max-iter 2400 --max-minutes 0 \
	  --eval-period 400 --output output/shapes_backbone/backbone.pth
	OMP_NUM_THREADS=1 $(PY) tools/train_net.py --config-file configs/shapes/detr_tiny_pretrain_single_stage.yaml --resume
	$(PY) tools/slim_checkpoint.py --input $(PRETRAIN_RUN)/model_final.pth --output $(BUNDLED) \
	  --metrics $(PRETRAIN_RUN)/metrics.json --config $(PRETRAIN_RUN)/config.yaml

# The DINO twin of `make demo`: the same custom split, fine-tuning, evaluation and drawings,
# from the bundled shapes DINO ($(DINO_BUNDLED)).
demo-dino: install
	$(PY) tools/run_demo.py --config-file configs/shapes/dino_tiny_finetune_custom.yaml --output output/demo_dino

# Rebuild $(DINO_BUNDLED): the 6-class pretraining shapes and the tiny CNN backbone as
# `make pretrain` makes them (the backbone is kept when $(BACKBONE) exists), then DINO on
# top ($(DINO_PRETRAIN_CONFIG): backbone frozen), then the slim copy. Resumable: an
# interrupted DINO run goes on from its last checkpoint (every 500 iterations).
pretrain-dino: install
	$(PY) datasets/prepare_shapes.py --preset pretrain --splits train:4000,val:200 --output $(PRETRAIN_DATA)
	@test -f $(BACKBONE) || $(PY) tools/pretrain_backbone.py --dataset-dir $(PRETRAIN_DATA) --max-iter 2400 \
	  --max-minutes 0 --eval-period 400 --output $(BACKBONE)
	OMP_NUM_THREADS=1 $(PY) tools/train_net.py --config-file $(DINO_PRETRAIN_CONFIG) --resume
	$(PY) tools/slim_checkpoint.py --input $(DINO_PRETRAIN_RUN)/model_final.pth --output $(DINO_BUNDLED) \
	  --metrics $(DINO_PRETRAIN_RUN)/metrics.json --config $(DINO_PRETRAIN_RUN)/config.yaml

clean-venv:
	rm -rf $(VENV)
