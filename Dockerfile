# syntax=docker/dockerfile:1
# The splitserve image every pod of the Helm chart runs (Ray head and workers, controller,
# routers): the project with its `serve` extra, Ray with its dashboard agent (KubeRay's probes)
# and client (the controller), as a non-root user. Two builds of one recipe:
#   docker build -t ghcr.io/splitserve/splitserve:0.1.0-cpu .                          (CPU)
#   docker build --build-arg FLAVOR=cuda -t ghcr.io/splitserve/splitserve:0.1.0-cuda .  (CUDA)
# The Ray version must be the chart's ray.version (rayVersion); client and cluster run this same
# image, so their Ray and Python versions match.
ARG FLAVOR=cpu

# ---- bases: Python and the tools KubeRay's probes use (wget), per flavor --------------------------
FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv wget \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true)

# ---- build: a virtual environment with torch first (the flavor's build), then the project --------
FROM base-${FLAVOR} AS build
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
RUN python3 -m venv /opt/splitserve
ENV PATH=/opt/splitserve/bin:$PATH
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitserve ./splitserve
COPY engine ./engine
COPY cluster ./cluster
COPY router ./router
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
COPY kv_transfer ./kv_transfer
COPY proto ./proto
RUN pip install --no-cache-dir "/src[serve]" "ray[default,client]==${RAY_VERSION}"

# ---- runtime: the environment alone, run as an unprivileged user ---------------------------------
FROM base-${FLAVOR} AS runtime
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash splitserve
COPY --from=build /opt/splitserve /opt/splitserve
ENV PATH=/opt/splitserve/bin:$PATH \
    PYTHONUNBUFFERED=1
# KubeRay starts Ray through a login shell (bash -l), which resets PATH from /etc/profile
RUN echo 'export PATH=/opt/splitserve/bin:$PATH' > /etc/profile.d/splitserve.sh
USER 1000:1000
WORKDIR /home/splitserve
CMD ["splitserve", "--help"]
