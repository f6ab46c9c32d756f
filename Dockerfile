# One image for the API, the workers and beat. CPU torch by default; for GPU hosts build with
#   docker compose build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    QFILTERS_DATA_DIR=/data HF_HOME=/data/hf QFILTERS_CACHE=/data/qfilters-cache

RUN useradd --create-home --uid 1000 qfilters && mkdir -p /data && chown qfilters /data
WORKDIR /app
# torch first, from the chosen index: the project's own requirements would otherwise pull the default build
RUN pip install torch --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md alembic.ini ./
COPY qfilters qfilters
COPY registry registry
COPY workers workers
COPY migrations migrations
RUN pip install ".[service,workers]"

USER qfilters
EXPOSE 8000
CMD ["uvicorn", "registry.main:app", "--host", "0.0.0.0", "--port", "8000"]
