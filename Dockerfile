# syntax=docker/dockerfile:1
#
# safety-classifier image: `safety serve` (gRPC :50051, metrics :9090) or `safety worker` (Celery).
#
#   CPU (default):  docker build -t safety-classifier:0.1.0 .
#   CUDA torch:     docker build --build-arg TORCH_VARIANT=cu128 -t safety-classifier:0.1.0-cuda .
#   + flash-attn:   docker build --build-arg TORCH_VARIANT=cu128 \
#                     --build-arg BUILD_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg FLASH_ATTN="flash-attn==2.8.3" -t safety-classifier:0.1.0-cuda-fa .
#
# CUDA torch wheels carry their own CUDA runtime, so the slim Python base serves GPUs too (the node's
# driver comes in through the NVIDIA container runtime). A CUDA devel base is needed only to compile
# flash-attn, which is optional: without it the engine uses torch's own varlen attention.
# The bundled default model ships inside the package (model/default/), so the image serves with no volume.
# tests/k8s/test_dockerfile.py checks that the commands named here are the ones the package installs.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUILD_IMAGE=${BASE_IMAGE}
ARG TORCH_VARIANT=cpu

# ---- build: a virtualenv at /opt/venv with torch, the package, its extras and the generated stubs -------
FROM ${BUILD_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT
ARG FLASH_ATTN=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# CUDA bases (Ubuntu) have no Python of their own; the Python base images do.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
# torch first, from the CPU or CUDA index, so no dependency can pull another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto/ proto/
COPY model/ model/
COPY service/ service/
COPY worker/ worker/
# The wheel build (setup.py) generates the gRPC stubs from proto/ into the package; it runs without build
# isolation so it finds grpcio-tools, installed first at the version pyproject pins for the service extra.
RUN pip install "setuptools>=69" wheel \
      "$(python -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['service'] if d.startswith('grpcio-tools')))")" \
    && pip install --no-build-isolation ".[service,worker]" \
    && if [ -n "${FLASH_ATTN}" ]; then pip install ninja && pip install --no-build-isolation "${FLASH_ATTN}"; fi \
    && pip check
# Fail the build, not the rollout, if a command or the stubs are missing.
RUN cd / && safety --help >/dev/null \
    && safety serve --help >/dev/null \
    && safety worker --help >/dev/null \
    && python -c "import service.stubs"

# ---- runtime: the venv on a clean base, a non-root user, a read-only-friendly layout ---------------------
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VARIANT
# CUDA builds: torch.compile (SAFETY_COMPILE=auto is on for CUDA) runs Triton, which compiles its CUDA driver
# module (driver.c) with a C compiler against Python.h when a process first uses it.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
        $([ "${TORCH_VARIANT}" = cpu ] || echo python3-dev) \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if [ "${TORCH_VARIANT}" != cpu ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 safety \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin safety
COPY --from=build /opt/venv /opt/venv
# Everything that may write goes to /tmp (an emptyDir in Kubernetes, where the root filesystem is read-only).
# MALLOC_ARENA_MAX=2: glibc's per-thread arenas kept the copies of large requests (gRPC, protobuf, Python)
# after them: peak RSS under a stream of 51 MB requests 1.57 -> 1.08 GB, throughput unchanged
# (docs/benchmarks.md).
ENV PATH=/opt/venv/bin:${PATH} \
    MALLOC_ARENA_MAX=2 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton
USER 10001:10001
WORKDIR /tmp
# `safety serve`: gRPC 50051, metrics 9090. `safety worker`: metrics 9101.
EXPOSE 50051 9090 9101
ENTRYPOINT ["safety"]
CMD ["serve"]
