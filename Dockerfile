# One image for the api, the worker and the one-shot migration: they differ only in their command.
FROM python:3.11-slim

# Any torch 2.x works; the default wheel from PyPI carries CUDA for the GPU workers.
ARG TORCH_SPEC="torch>=2.3,<3"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRPO_DATA_DIR=/data

WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md alembic.ini ./
COPY trainer trainer
COPY jobs jobs
COPY api api
COPY worker worker
COPY grpo_client grpo_client
COPY migrations migrations
RUN pip install .

EXPOSE 8000
CMD ["grpo", "serve", "--host", "0.0.0.0", "--port", "8000"]
