# syntax=docker/dockerfile:1
#
# voxtral-server GPU image.
#
#   docker build -t voxtral-server:0.1.0 .
#   docker run --gpus all --shm-size 2g -p 8000:8000 -v voxtral-cache:/cache voxtral-server:0.1.0
#
# The default torch wheel from PyPI (torch 2.13.0) is a CUDA 13.0 build, so the base image is CUDA 13.0
# (NVIDIA driver >= 580). For hosts with an older driver pick a CUDA 12.x base and the matching PyTorch
# wheel index, e.g.
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The torch wheel brings its own CUDA libraries; nvidia/cuda:<ver>-base-ubuntu24.04 also works as
# BASE_IMAGE and makes the image a few GB smaller, at the cost of no system cuDNN/cuBLAS for other libs.
# Builder and runtime stages must use the same base so the venv's /usr/bin/python3.12 matches.

ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
# builder: a venv with torch + the project; nothing from this stage but /opt/venv reaches the image.
# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's python3.12 packages follow the archive's security updates; an exact pin would stop
# building as soon as the archive moves on. The base image tag is what pins the userland.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Ubuntu's bundled pip (24.0) predates some wheel metadata in use today; pin a current one.
ARG PIP_VERSION=26.3
RUN python3.12 -m venv "${VIRTUAL_ENV}" \
    && pip install --no-cache-dir "pip==${PIP_VERSION}"

# torch first, in its own layer: it is by far the largest download and changes least often.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project and its pinned dependencies (pyproject.toml); torch is already satisfied above.
COPY pyproject.toml README.md /src/
COPY app /src/app
RUN pip install --no-cache-dir /src \
    && pip check \
    && python -c "import app"

# ---------------------------------------------------------------------------------------------------
# runtime: the base image + python3.12 + the venv. No compilers, no pip cache, non-root.
# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

LABEL org.opencontainers.image.title="voxtral-server" \
      org.opencontainers.image.description="OpenAI-compatible HTTP server for Mistral's Voxtral audio-language models" \
      org.opencontainers.image.licenses="Apache-2.0"

# Same reason as in the builder stage for not pinning exact Ubuntu package versions.
# jemalloc replaces glibc's malloc (LD_PRELOAD below): under bench/load.py glibc's heap grew to
# ~1.1-1.5 GB and drifted 17-37 % between rounds; jemalloc held ~0.6 GB and drifted 1-9 %, no slower.
# The link gives it one path on every architecture.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 ca-certificates libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libjemalloc.so.2 -print -quit)" /usr/local/lib/libjemalloc.so.2 \
    && test -e /usr/local/lib/libjemalloc.so.2 \
    && groupadd --gid 10001 voxtral \
    && useradd --uid 10001 --gid voxtral --create-home --home-dir /home/voxtral --shell /usr/sbin/nologin voxtral \
    && mkdir -p /cache \
    && chown voxtral:voxtral /cache

# Root-owned: the server cannot modify its own code.
COPY --from=builder /opt/venv /opt/venv

# Every cache a library may write goes under /cache (a volume), so the root filesystem can be
# read-only and a restarted container does not download the model again.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LD_PRELOAD=/usr/local/lib/libjemalloc.so.2 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache/xdg \
    VOXTRAL_CACHE_DIR=/cache/voxtral-server \
    VOXTRAL_MODEL=mistralai/Voxtral-Mini-3B-2507 \
    VOXTRAL_HOST=0.0.0.0 \
    VOXTRAL_PORT=8000 \
    VOXTRAL_DRAIN_TIMEOUT_S=30

USER 10001:10001
WORKDIR /home/voxtral
VOLUME /cache
EXPOSE 8000

# Liveness only (/health answers while the model loads); readiness is GET /ready.
# urllib instead of curl: the runtime image has no curl. Any non-2xx raises, so the exit code is 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VOXTRAL_PORT', '8000'), timeout=4)"]

# The server drains accepted requests for VOXTRAL_DRAIN_TIMEOUT_S after SIGTERM; give the container
# at least that long to stop (docker stop -t, compose stop_grace_period, k8s terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["voxtral-server", "serve"]
CMD []
