# caffe-ft images: scripts/build-image builds them (docker where a daemon
# answers, buildah otherwise); docs/docker.md says what was built and run.
#
#   scripts/build-image cpu         debian:bullseye + Debian's Caffe 1.0 (CPU)
#   scripts/build-image gpu         CUDA base + BVLC Caffe with CUDA/cuDNN/NCCL
#   scripts/build-image torch-gpu   debian:bookworm + caffe-ft[torch] (PyTorch's
#                                   wheels carry CUDA; no Caffe)
#   scripts/run-image cpu finetune ...   (the current folder mounted, your uid)
#
# pip steps mount the build secret `host-ca` (the host's CA bundle, for hosts
# behind a TLS-inspecting proxy; scripts/build-image passes it, empty when
# there is none) and use it when it is not empty. A plain
# `docker build --target cpu .` works too (BuildKit; no secret needed).
#
# cpu: built and run by tests/test_image.py (a fine-tuning job in it).
# torch-gpu: built here with PyTorch's CPU wheel (docs/docker.md); the CUDA
#   wheel's path is the same pip install.
# gpu: NOT built as an image (no CUDA base image is reachable where this was
#   written). scripts/build-caffe-cuda.sh's download-free part ran on Ubuntu
#   24.04 with CUDA 13.0 on an H200 (`caffe device_query`, `caffe time`,
#   `caffe train`); the base image, its apt step, pycaffe on Python 3.12 and
#   the architectures other than sm_90 are unverified.

# Each image is a *-base stage (Caffe or torch: slow, changes rarely) and a
# last stage that installs caffe-ft on it. The last stage starts from the
# base stage by default; scripts/build-image (buildah) builds and tags the base
# once per content of the Dockerfile and scripts/, and passes it here, so a
# change of caffe-ft's sources rebuilds the last stage alone.
ARG CPU_BASE=cpu-base
ARG GPU_BASE=gpu-base
ARG TORCH_GPU_BASE=torch-gpu-base

FROM debian:bullseye AS cpu-base

# Quieten Caffe's glog INFO/WARNING output, as scripts/caffe-env does.
ENV GLOG_minloglevel=2
ENTRYPOINT ["caffe-ft"]

ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_DEFAULT_TIMEOUT

# Bullseye's LTS ended 2026-08-31: when its suites have left the mirrors,
# apt-archive-fallback.sh points the sources at the Debian archive.
COPY scripts/apt-archive-fallback.sh scripts/install-caffe-debian.sh /usr/local/share/caffe-ft/
RUN --mount=type=secret,id=host-ca,target=/run/host-ca.crt \
    if [ -s /run/host-ca.crt ]; then export PIP_CERT=/run/host-ca.crt; fi \
    && bash /usr/local/share/caffe-ft/apt-archive-fallback.sh \
    && bash /usr/local/share/caffe-ft/install-caffe-debian.sh


FROM ${CPU_BASE} AS cpu
# caffe-ft itself. Bullseye's pip 20.3 needs a setup.py or pyproject.toml to
# build from; a setup.cfg-only tree gets a shim, as in scripts/caffe-env.
COPY . /opt/caffe-ft-src
RUN cd /opt/caffe-ft-src \
    && { [ -e setup.py ] || [ -e pyproject.toml ] \
         || printf 'from setuptools import setup\n\nsetup()\n' > setup.py; } \
    && python3 -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && cd / && rm -rf /opt/caffe-ft-src


# ---------------------------------------------------------------------------
# gpu: BVLC Caffe compiled with CUDA, cuDNN and NCCL (see the header above for
# what was and was not checked). Compiling for all the architectures below
# takes long (roughly half an hour to an hour on 8 cores); build for your GPUs
# only with e.g. --build-arg CUDA_ARCH_BIN="86" --build-arg CUDA_ARCH_PTX="86".
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS gpu-base

# Machine code for Pascal (60, 61), Volta (70), Turing (75), Ampere (80, 86),
# Ada (89), Hopper (90) and Blackwell (100, 120); PTX of 120 lets the driver
# compile for later GPUs.
ARG CUDA_ARCH_BIN="60 61 70 75 80 86 89 90 100 120"
ARG CUDA_ARCH_PTX="120"

COPY scripts/build-caffe-cuda.sh /usr/local/share/caffe-ft/scripts/build-caffe-cuda.sh
COPY docker/patches /usr/local/share/caffe-ft/docker/patches
RUN CUDA_ARCH_BIN="$CUDA_ARCH_BIN" CUDA_ARCH_PTX="$CUDA_ARCH_PTX" \
    bash /usr/local/share/caffe-ft/scripts/build-caffe-cuda.sh --prefix /opt/caffe

# caffe-ft's Python dependencies from Ubuntu, like the cpu target's from Debian
# (python3-opencv: `caffe-ft features` and `advise` read images with cv2).
# Unpinned: the base image fixes the Ubuntu release, whose archive moves on.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       python3-click python3-jinja2 python3-matplotlib python3-opencv python3-pip \
       python3-setuptools python3-sklearn python3-tqdm python3-wheel >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

# Which GPUs this Caffe has code for, for `caffe-ft doctor` (BIN;PTX).
ENV PATH=/opt/caffe/bin:$PATH \
    GLOG_minloglevel=2 \
    CAFFE_FT_CAFFE_CUDA_ARCHS="$CUDA_ARCH_BIN;$CUDA_ARCH_PTX" \
    CAFFE_FT_ENGINE=pycaffe


FROM ${GPU_BASE} AS gpu
COPY . /opt/caffe-ft-src
# Ubuntu 24.04's Python is "externally managed": pip needs to be told that
# installing caffe-ft beside the apt packages is intended. Build-only checks
# (no GPU here): pycaffe and its submodules import, NCCL is in.
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation \
       --break-system-packages /opt/caffe-ft-src \
    && install -m 755 /opt/caffe-ft-src/docker/entrypoint.sh /usr/local/bin/caffe-ft-start \
    && rm -rf /opt/caffe-ft-src \
    && python3 -c "import caffe, caffe.io, caffe.net_spec, caffe_ft; assert caffe.has_nccl()" \
    && caffe-ft --version

# `caffe-ft doctor` first (a Convolution forward pass on GPU 0), then caffe-ft.
ENTRYPOINT ["caffe-ft-start"]


# ---------------------------------------------------------------------------
# torch-gpu: caffe-ft on its PyTorch engine (no Caffe). PyPI's torch wheels
# for Linux x86-64 carry CUDA, cuDNN and NCCL, so a plain Debian base does: the
# host needs the NVIDIA driver and the NVIDIA Container Toolkit. TORCH_SPEC
# picks the wheel (e.g. torch==2.13.0+cpu from a PIP_FIND_LINKS folder).
FROM debian:bookworm AS torch-gpu-base

# Settings before the big layers (see the cpu target).
ENV PATH=/opt/caffe-ft/bin:$PATH \
    CAFFE_FT_ENGINE=torch
ENTRYPOINT ["caffe-ft-start"]

ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_DEFAULT_TIMEOUT
ARG TORCH_SPEC=torch

# Python and torch in the base stage.
COPY scripts/install-torch-debian.sh /usr/local/share/caffe-ft/
RUN --mount=type=secret,id=host-ca,target=/run/host-ca.crt \
    if [ -s /run/host-ca.crt ]; then export PIP_CERT=/run/host-ca.crt; fi \
    && bash /usr/local/share/caffe-ft/install-torch-debian.sh --torch "$TORCH_SPEC"


FROM ${TORCH_GPU_BASE} AS torch-gpu
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_DEFAULT_TIMEOUT
ARG TORCH_SPEC=torch
COPY . /opt/caffe-ft-src
RUN --mount=type=secret,id=host-ca,target=/run/host-ca.crt \
    if [ -s /run/host-ca.crt ]; then export PIP_CERT=/run/host-ca.crt; fi \
    && bash /usr/local/share/caffe-ft/install-torch-debian.sh --torch "$TORCH_SPEC" /opt/caffe-ft-src \
    && install -m 755 /opt/caffe-ft-src/docker/entrypoint.sh /usr/local/bin/caffe-ft-start \
    && rm -rf /opt/caffe-ft-src
