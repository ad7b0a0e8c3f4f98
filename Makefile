# detr_d2: `make install`, `make test`, `make demo`.
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

.PHONY: install test clean-venv

install: $(STAMP)

$(STAMP): setup.py scripts/install_detectron2.py Makefile
	@test -x $(PY) || { echo "[install] creating $(VENV) with $(PYTHON_SYSTEM)"; $(PYTHON_SYSTEM) -m venv $(VENV); }
	@if $(PY) -c "import torch, torchvision" 2>/dev/null; then \
	  echo "[install] torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	else \
	  echo "[install] installing $(TORCH)"; $(PIP) install $(PIP_NET) $(TORCH); \
	fi
	@$(PY) scripts/install_detectron2.py --cache-dir .cache
	@echo "[install] installing detr_d2 (editable) with its dependencies and test tools"
	@$(PIP) install -q $(PIP_NET) --no-build-isolation -e '.[test]'
	@$(PY) -c "import detr_d2, detectron2; print('[install] detr_d2 ready; detectron2', detectron2.__version__, 'from', detectron2.__path__[0])"
	@touch $(STAMP)

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
