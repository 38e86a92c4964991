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

test: setup
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
