# caffe-ft images.
#
#   docker build --target cpu -t caffe-ft:cpu .
#   docker run --rm -v "$PWD:/data" -w /data caffe-ft:cpu --help
#   docker build --target gpu -t caffe-ft:gpu .
#   docker run --rm --gpus all -v "$PWD:/data" -w /data caffe-ft:gpu --help
#
# The cpu target is the reference environment of scripts/caffe-env (Debian
# bullseye's Caffe 1.0, CPU), built by the same scripts/install-caffe-debian.sh,
# with caffe-ft installed on top. The gpu target compiles the same Caffe code
# (BVLC/caffe 99bd997, Debian's 1.0.0+git20180821.99bd997) with CUDA 12.8,
# cuDNN 9 and NCCL: scripts/build-caffe-cuda.sh and docker/patches/. More, and
# the GPUs each supports, in docs/docker.md.
#
# What was checked without a Docker engine (none runs where this was written):
# - cpu: its script is the one scripts/caffe-env builds and tests with.
# - gpu: NOT built as an image. scripts/build-caffe-cuda.sh passed shellcheck;
#   its download-free part (unpack, tree digest, patches, CMake, build, install)
#   ran on Ubuntu 24.04 with CUDA 13.0, cuDNN 9.19, NCCL and gcc 13 (an H200
#   machine: `caffe device_query`, `caffe time` on ResNet-50 with cuDNN and a
#   short `caffe train` ran on the GPU), without OpenCV, LMDB, LevelDB and
#   pycaffe. Not run: this base image (CUDA 12.8), its apt-get step, the GitHub
#   download, pycaffe (Python 3.12, Boost.Python 1.83), OpenCV 4.6, the
#   architectures other than sm_90, multi-GPU NCCL, and caffe-ft on top.

FROM debian:bullseye AS cpu

COPY scripts/install-caffe-debian.sh /usr/local/share/caffe-ft/install-caffe-debian.sh
RUN bash /usr/local/share/caffe-ft/install-caffe-debian.sh

# Quieten Caffe's glog INFO/WARNING output, as scripts/caffe-env does.
ENV GLOG_minloglevel=2

COPY . /opt/caffe-ft-src
# Bullseye's pip 20.3 needs a setup.py or pyproject.toml to build from;
# a setup.cfg-only tree gets a shim, as in scripts/caffe-env.
RUN cd /opt/caffe-ft-src \
    && { [ -e setup.py ] || [ -e pyproject.toml ] \
         || printf 'from setuptools import setup\n\nsetup()\n' > setup.py; } \
    && python3 -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && cd / && rm -rf /opt/caffe-ft-src

ENTRYPOINT ["caffe-ft"]


# ---------------------------------------------------------------------------
# gpu: BVLC Caffe compiled with CUDA, cuDNN and NCCL (see the header above for
# what was and was not checked). Compiling for all the architectures below
# takes long (roughly half an hour to an hour on 8 cores); build for your GPUs
# only with e.g. --build-arg CUDA_ARCH_BIN="86" --build-arg CUDA_ARCH_PTX="86".
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS gpu

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

ENV PATH=/opt/caffe/bin:$PATH \
    GLOG_minloglevel=2

COPY . /opt/caffe-ft-src
# Ubuntu 24.04's Python is "externally managed": pip needs to be told that
# installing caffe-ft beside the apt packages is intended.
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation \
       --break-system-packages /opt/caffe-ft-src \
    && rm -rf /opt/caffe-ft-src \
    && python3 -c "import caffe, caffe_ft; assert caffe.has_nccl()" \
    && caffe-ft --version

ENTRYPOINT ["caffe-ft"]
