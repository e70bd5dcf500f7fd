# syntax=docker/dockerfile:1.7
# diffad inspection service images. Two targets:
#
#   gpu (default)  NVIDIA CUDA 12.8 runtime + cuDNN 9 on Ubuntu 24.04, Python 3.12: TensorRT 10 (Python wheels),
#                  onnxruntime-gpu, cuda-python and the project with its `serve`, `gpu`, `triton` and `tracing`
#                  extras.
#   cpu            python:3.11-slim-bookworm: the project with its `serve`, `triton` and `tracing` extras (ONNX
#                  Runtime on the CPU, or the gateway to Triton: DIFFAD_BACKEND=triton).
#
#   docker build -t diffad:gpu .                 # or: docker compose build
#   docker build -t diffad:cpu --target cpu .
#
# Neither image holds PyTorch: the serving path does not need it, and the build fails if anything pulls it in.
# Versions come from deploy/requirements/*.txt (constraints; regenerate with deploy/requirements/lock.sh).
# Base images are pinned by tag and digest; override with --build-arg CPU_BASE_IMAGE=... / GPU_BASE_IMAGE=...
# The GPU image needs an NVIDIA driver that runs CUDA 12.8 (R570 or newer, or a datacenter R535/R550 branch).

ARG CPU_BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
ARG GPU_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@sha256:ac55d124da4882b497f732d8dfd9a702d5447a5f29d08d56da6f64f0a1eb34bc

# ---------------------------------------------------------------------------------------------------------
# source: what both images install from, copied once: the project files and the package's folders
# (pyproject.toml's package-dir; tests/test_deploy.py checks the lists agree).
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY deploy/requirements/ /src/deploy/requirements/
COPY deploy/verify_image.py /src/deploy/verify_image.py
COPY diffad/ /src/diffad/
COPY models/ /src/models/
COPY training/ /src/training/
COPY evaluation/ /src/evaluation/
COPY export/ /src/export/
COPY service/ /src/service/
COPY bench/*.py /src/bench/

# ---------------------------------------------------------------------------------------------------------
# cpu: build the virtual environment, then copy it into a clean base.
FROM ${CPU_BASE_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/diffad
WORKDIR /src
COPY --from=source /src/ ./
RUN /opt/diffad/bin/pip install -c deploy/requirements/serve-cpu.txt ".[serve,triton,tracing]" \
 && /opt/diffad/bin/python deploy/verify_image.py --backend onnxruntime

FROM ${CPU_BASE_IMAGE} AS cpu
LABEL org.opencontainers.image.title="diffad" \
      org.opencontainers.image.description="DiffusionAD visual anomaly detection service (ONNX Runtime, CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 diffad \
 && useradd --system --uid 10001 --gid diffad --home-dir /home/diffad --create-home --shell /usr/sbin/nologin diffad \
 && mkdir -p /models /var/cache/diffad/engines \
 && chown diffad:diffad /var/cache/diffad/engines
COPY --from=cpu-build /opt/diffad /opt/diffad
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/diffad-entrypoint
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/diffad-healthcheck
ENV PATH=/opt/diffad/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIFFAD_MODELS_DIR=/models \
    DIFFAD_ENGINE_CACHE=/var/cache/diffad/engines \
    XDG_CACHE_HOME=/var/cache/diffad/engines/.cache \
    DIFFAD_BACKEND=onnxruntime \
    DIFFAD_HOST=0.0.0.0 \
    DIFFAD_PORT=8000
USER 10001:10001
WORKDIR /home/diffad
EXPOSE 8000
VOLUME ["/var/cache/diffad/engines"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["diffad-healthcheck"]
ENTRYPOINT ["diffad-entrypoint"]
CMD []

# ---------------------------------------------------------------------------------------------------------
# gpu: the same, on the CUDA runtime image (its Python is Ubuntu's python3, 3.12).
FROM ${GPU_BASE_IMAGE} AS gpu-build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/diffad
WORKDIR /src
COPY --from=source /src/ ./
# The serve extra brings the CPU onnxruntime and the gpu extra onnxruntime-gpu; both install into the same
# `onnxruntime` package folder, so the CPU one is removed and the GPU one reinstalled over a clean folder.
# tensorrt-cu12-libs is a stub on PyPI that fetches its wheel from NVIDIA's index: name that index directly.
RUN /opt/diffad/bin/pip install --extra-index-url https://pypi.nvidia.com \
        -c deploy/requirements/gpu-cu12.txt ".[serve,gpu,triton,tracing]" \
 && /opt/diffad/bin/pip uninstall -y onnxruntime onnxruntime-gpu \
 && /opt/diffad/bin/pip install --no-deps -c deploy/requirements/gpu-cu12.txt onnxruntime-gpu \
 && /opt/diffad/bin/python deploy/verify_image.py --backend tensorrt

FROM ${GPU_BASE_IMAGE} AS gpu
LABEL org.opencontainers.image.title="diffad" \
      org.opencontainers.image.description="DiffusionAD visual anomaly detection service (TensorRT / ONNX Runtime, NVIDIA GPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 diffad \
 && useradd --system --uid 10001 --gid diffad --home-dir /home/diffad --create-home --shell /usr/sbin/nologin diffad \
 && mkdir -p /models /var/cache/diffad/engines \
 && chown diffad:diffad /var/cache/diffad/engines
COPY --from=gpu-build /opt/diffad /opt/diffad
COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/diffad-entrypoint
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/diffad-healthcheck
ENV PATH=/opt/diffad/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIFFAD_MODELS_DIR=/models \
    DIFFAD_ENGINE_CACHE=/var/cache/diffad/engines \
    XDG_CACHE_HOME=/var/cache/diffad/engines/.cache \
    DIFFAD_BACKEND=auto \
    DIFFAD_HOST=0.0.0.0 \
    DIFFAD_PORT=8000 \
    CUDA_CACHE_PATH=/var/cache/diffad/engines/.cache/nv \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/diffad
EXPOSE 8000
VOLUME ["/var/cache/diffad/engines"]
# start-period: the first start on a new GPU builds TensorRT engines before the server listens.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["diffad-healthcheck"]
ENTRYPOINT ["diffad-entrypoint"]
CMD []
