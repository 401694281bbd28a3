# syntax=docker/dockerfile:1
# SafeEdit Guard: the proxy, no model weights inside (mount them, or use a remote judge).
#   docker build -t safeedit-guard .                                  CPU torch (default)
#   docker build -t safeedit-guard:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   CUDA torch (an index
#                                                 that torch 2.13 lists for your driver)
#   docker run -v ./config.yaml:/etc/safeedit/config.yaml:ro -p 8000:8000 safeedit-guard
# The config must have `keys:`: without API keys the proxy serves loopback only (see
# docs/deploy.md); compose.yaml and deploy/kubernetes/ mount one.

FROM python:3.11-slim-bookworm AS builder

# torch comes from its own index, pinned as in the Makefile: the CPU wheels by default (PyPI's
# torch is the CUDA build, several GB the CPU image does not need); set a CUDA index to get those.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/safeedit/bin:$PATH

RUN python -m venv /opt/safeedit \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /src
# Only what the wheel is built from (guard/policies links to policies/).
COPY pyproject.toml README.md proxy.py ./
COPY guard ./guard
COPY adapters ./adapters
COPY policies ./policies
# `torch==2.13.0` in pyproject.toml is met by the local build above, so pip keeps it.
RUN pip install --no-cache-dir . \
 && python -m compileall -q /opt/safeedit/lib


FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="safeedit-guard" \
      org.opencontainers.image.description="Guardrail proxy for OpenAI-style image APIs" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
ARG UID=10001
RUN groupadd --system --gid "${UID}" safeedit \
 && useradd --system --uid "${UID}" --gid safeedit --home-dir /var/lib/safeedit \
            --create-home --shell /usr/sbin/nologin safeedit \
 && mkdir -p /etc/safeedit/policies

COPY --from=builder /opt/safeedit /opt/safeedit

# HOME and the working directory are the one writable place the process needs (./var/ when the
# config keeps anything on local disk); caches of torch and the hub go under HOME too.
ENV PATH=/opt/safeedit/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/safeedit \
    SAFEEDIT_HEALTH_URL=http://127.0.0.1:8000/healthz

WORKDIR /var/lib/safeedit
USER ${UID}:${UID}
EXPOSE 8000

# Liveness only (the process answers); readiness (/readyz) is for load balancers and Kubernetes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SAFEEDIT_HEALTH_URL'], timeout=4)"]

ENTRYPOINT ["safeedit", "serve"]
CMD ["--host", "0.0.0.0", "--config", "/etc/safeedit/config.yaml"]
