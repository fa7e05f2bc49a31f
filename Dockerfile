# syntax=docker/dockerfile:1
# Lanner, CPU-only:   docker build -t lanner:local .
#                     docker run -p 8000:8000 -v lanner-cache:/home/lanner/.cache/lanner lanner:local
# `lanner serve` is configured by environment: LANNER_MODEL, LANNER_MODEL_ID, LANNER_QUANTIZE,
# LANNER_CPUS, LANNER_MAX_NUM_SEQS, LANNER_CONFIG, LANNER_API_KEY, LANNER_CACHE_DIR, LANNER_LOG_LEVEL,
# LANNER_HOST, LANNER_PORT (see README.md); with no model it serves the offline demo models.
#
# tests/deploy/test_compose.py executes the builder stage below (its ARG/ENV/WORKDIR/COPY/RUN lines,
# .dockerignore applied) outside Docker and runs `lanner --version` from the venv it builds: keep the
# builder to those instructions, and keep absolute paths out of its RUN lines (use $VENV).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# torch comes from PyTorch's CPU-only index, pinned to pyproject.toml's version (install.sh checks the
# two agree): PyPI's Linux torch wheels are CUDA builds that pull GBs of nvidia-* packages.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV VENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first, in its own layer: code changes don't re-download it.
COPY pyproject.toml ./
COPY docker/install.sh docker/
RUN sh docker/install.sh torch "$VENV"
COPY README.md ./
COPY app app/
RUN sh docker/install.sh app "$VENV" .

FROM ${PYTHON_IMAGE}
# The app is installed into the venv (non-editable), so the venv is all the final image needs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/lanner/.cache/lanner/huggingface \
    LANNER_HOST=0.0.0.0 \
    LANNER_PORT=8000
# g++: Lanner compiles its kernels (app/quant/csrc: WOQ matmuls and the decoder's C++ ops) for the CPU the
# container runs on, at the first model load (~15 s), and caches them in the volume below; without a
# compiler it uses ATen's ops.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin lanner \
 && mkdir -p /home/lanner/.cache/lanner \
 && chown -R lanner:lanner /home/lanner/.cache
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/lanner-healthcheck
# uid 1000 = lanner; numeric so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
WORKDIR /home/lanner
# Demo models, hub downloads and checkpoints quantized at load (settings cache_dir = ~/.cache/lanner;
# LANNER_CACHE_DIR moves it).
VOLUME ["/home/lanner/.cache/lanner"]
EXPOSE 8000
# Liveness: the HTTP server answers (it starts after hub downloads; weights then load in the background,
# which /ready reports). The start period covers a first-run model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "/usr/local/bin/lanner-healthcheck", "/health"]
ENTRYPOINT ["lanner"]
CMD ["serve"]
