#!/bin/bash
# Build and install BVLC Caffe with CUDA, cuDNN and NCCL, and pycaffe for the
# system Python 3.
#
# Runs as root on an NVIDIA CUDA "devel" Ubuntu image; the Dockerfile's `gpu`
# target runs it on nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04. No distribution
# ships a CUDA Caffe any more (Debian bullseye has only the CPU build), so it is
# compiled here. Checked (docs/docker.md): built with --no-apt --no-python on an
# Ubuntu 24.04 machine with CUDA 13.0, cuDNN 9.19 and NCCL, where `caffe time`
# and `caffe train` ran on an H200; the apt step and pycaffe were not run.
#
# Source: BVLC/caffe at commit 99bd997 (2018-08-21), the snapshot that Debian
# packages as caffe 1.0.0+git20180821.99bd997: the same Caffe code as the cpu
# target and scripts/caffe-env, built for the GPU. The unpacked tree is checked
# against a digest of its files (GitHub's tarballs are not byte-stable, their
# contents are). Patches: docker/patches/*.patch, applied in order, each
# explained in its header (cuDNN >= 8, OpenCV 4, Boost.Python naming, CUDA 13,
# protobuf >= 3.18).
#
# Usage: build-caffe-cuda.sh [options]
#   --no-apt           do not apt-get the build dependencies (already installed)
#   --source TARBALL   Caffe's source as a .tar.gz of that commit (default:
#                      download it from GitHub)
#   --patches DIR      the patch directory (default: ../docker/patches beside
#                      this script)
#   --prefix DIR       install prefix (default: /opt/caffe)
#   --jobs N           parallel compile jobs (default: all cores)
#   --no-python        do not build pycaffe
#   --workdir DIR      where to unpack and build (default: a temporary
#                      directory, removed at the end)
#
# Environment:
#   CUDA_ARCH_BIN      GPU architectures to compile machine code for
#                      (default "60 61 70 75 80 86 89 90 100 120": Pascal to
#                      Blackwell; CUDA 13 needs 75 or later)
#   CUDA_ARCH_PTX      architecture(s) whose PTX is embedded for the driver to
#                      compile for newer GPUs (default "120")
#   CAFFE_CMAKE_ARGS   extra CMake arguments, split on spaces
set -euo pipefail

CAFFE_COMMIT=99bd99795dcdf0b1d3086a8d67ab1782a8a08383
# sha256 of `sha256sum` over every file of the unpacked tree, sorted by path
# (LC_ALL=C), as computed by tree_digest below from Debian's orig tarball
# caffe_1.0.0+git20180821.99bd997.orig.tar.gz (a `git archive` of the commit).
CAFFE_TREE_SHA256=40e059ef5413038c0efa9460777fb94fabca35676804d6409491a49e909849a5
CAFFE_URL="https://github.com/BVLC/caffe/archive/$CAFFE_COMMIT.tar.gz"

CUDA_ARCH_BIN=${CUDA_ARCH_BIN:-"60 61 70 75 80 86 89 90 100 120"}
CUDA_ARCH_PTX=${CUDA_ARCH_PTX:-"120"}

# Build dependencies on Ubuntu 24.04 (the CUDA image brings CUDA, cuDNN, NCCL
# and the compilers). python3-protobuf, python3-six (net_spec) and
# python3-skimage (caffe.io): pycaffe imports them.
APT_PACKAGES=(
  ca-certificates cmake curl patch
  libboost-filesystem-dev libboost-python-dev libboost-system-dev libboost-thread-dev
  libgflags-dev libgoogle-glog-dev libhdf5-dev libleveldb-dev liblmdb-dev
  libopenblas-dev libopencv-dev libprotobuf-dev libsnappy-dev protobuf-compiler
  python3-dev python3-numpy python3-protobuf python3-six python3-skimage
)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

log() { printf 'build-caffe-cuda: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

use_apt=1
source_tarball=""
patch_dir="$SCRIPT_DIR/../docker/patches"
prefix=/opt/caffe
jobs=$(nproc)
build_python=ON
workdir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-apt) use_apt=0; shift ;;
    --source) [ $# -ge 2 ] || die "--source needs a file"; source_tarball=$2; shift 2 ;;
    --patches) [ $# -ge 2 ] || die "--patches needs a directory"; patch_dir=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs=$2; shift 2 ;;
    --no-python) build_python=OFF; shift ;;
    --workdir) [ $# -ge 2 ] || die "--workdir needs a directory"; workdir=$2; shift 2 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

# The digest CAFFE_TREE_SHA256 is of: every regular file under $1, by path.
tree_digest() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

# The directory holding $2 (a file name) under $1, first found; empty if none.
find_dir_of() {
  local found
  found=$(find "$1" -name "$2" \( -type f -o -type l \) 2>/dev/null | LC_ALL=C sort | head -n1)
  [ -n "$found" ] && dirname "$found"
  return 0
}

install_dependencies() {
  log "apt-get install: ${APT_PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
  apt-get clean
  rm -rf /var/lib/apt/lists/*
}

unpack_source() {
  local src=$1 tarball=$source_tarball
  if [ -z "$tarball" ]; then
    tarball="$workdir/caffe.tar.gz"
    log "downloading $CAFFE_URL"
    curl -fsSL --retry 3 -o "$tarball" "$CAFFE_URL"
  fi
  mkdir -p "$src"
  # GitHub's tarball has one top folder (caffe-<commit>/), git archive's none.
  tar -xzf "$tarball" -C "$src"
  local top
  top=$(find "$src" -mindepth 1 -maxdepth 1)
  if [ "$(printf '%s\n' "$top" | wc -l)" -eq 1 ] && [ -d "$top" ]; then
    (shopt -s dotglob && mv "$top"/* "$src"/ && rmdir "$top")
  fi
  local digest
  digest=$(tree_digest "$src")
  [ "$digest" = "$CAFFE_TREE_SHA256" ] \
    || die "Caffe source tree digest $digest is not $CAFFE_TREE_SHA256 (commit $CAFFE_COMMIT)"
  log "source: BVLC/caffe $CAFFE_COMMIT (tree digest checked)"
}

apply_patches() {
  local src=$1 patch
  [ -d "$patch_dir" ] || die "no patch directory $patch_dir"
  for patch in "$patch_dir"/*.patch; do
    log "patch: $(basename "$patch")"
    patch -d "$src" -p1 --forward --batch --quiet < "$patch"
  done
}

configure() {
  local src=$1 build=$2 blas_include blas_lib hdf5_lib hdf5_args=() cuda_root
  blas_include=$(find_dir_of /usr/include/x86_64-linux-gnu/openblas-pthread cblas.h)
  [ -n "$blas_include" ] || blas_include=$(find_dir_of /usr/include cblas.h)
  blas_lib=$(find /usr/lib -path '*openblas*' -name libopenblas.so 2>/dev/null | LC_ALL=C sort | head -n1)
  if [ -z "$blas_include" ] || [ -z "$blas_lib" ]; then
    die "OpenBLAS not found (cblas.h, libopenblas.so)"
  fi
  # Debian and Ubuntu keep the serial HDF5 in hdf5/serial folders (headers,
  # and libhdf5.so/libhdf5_hl.so links), which CMake's FindHDF5 may not search.
  hdf5_lib=$(find /usr/lib -path '*/hdf5/serial/libhdf5.so' 2>/dev/null | LC_ALL=C sort | head -n1)
  if [ -d /usr/include/hdf5/serial ] && [ -n "$hdf5_lib" ]; then
    hdf5_args=(-DCMAKE_INCLUDE_PATH=/usr/include/hdf5/serial -DCMAKE_LIBRARY_PATH="$(dirname "$hdf5_lib")")
  fi
  # CUDA 13 moved Thrust (which some .cpp files include) to include/cccl,
  # where nvcc looks but the C++ compiler does not.
  local cxx_flags=""
  cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
  if [ -d "$cuda_root/include/cccl/thrust" ]; then
    cxx_flags="-isystem $cuda_root/include/cccl"
  fi
  # cuDNN's headers may sit in a multiarch folder that Caffe's search misses;
  # cudnn_version.h (cuDNN >= 8) must be beside cudnn.h.
  local cudnn_args=() cudnn_include
  cudnn_include=$(find_dir_of /usr/include cudnn_version.h)
  [ -n "$cudnn_include" ] || cudnn_include=$(find_dir_of "$cuda_root/include" cudnn_version.h)
  if [ -n "$cudnn_include" ] && [ -e "$cudnn_include/cudnn.h" ]; then
    cudnn_args=(-DCUDNN_INCLUDE="$cudnn_include")
  fi
  log "configure: CUDA_ARCH_BIN='$CUDA_ARCH_BIN' CUDA_ARCH_PTX='$CUDA_ARCH_PTX'"
  # shellcheck disable=SC2086  # CAFFE_CMAKE_ARGS is a list of words
  cmake -S "$src" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
    -DCMAKE_CXX_FLAGS="$cxx_flags" \
    -DCPU_ONLY=OFF -DUSE_CUDNN=ON -DUSE_NCCL=ON \
    -DCUDA_ARCH_NAME=Manual -DCUDA_ARCH_BIN="$CUDA_ARCH_BIN" -DCUDA_ARCH_PTX="$CUDA_ARCH_PTX" \
    -DBLAS=Open -DOpenBLAS_INCLUDE_DIR="$blas_include" -DOpenBLAS_LIB="$blas_lib" \
    -DBoost_NO_BOOST_CMAKE=ON \
    -DBUILD_python="$build_python" -DBUILD_python_layer="$build_python" -Dpython_version=3 \
    -DBUILD_docs=OFF -DBUILD_matlab=OFF \
    "${hdf5_args[@]}" "${cudnn_args[@]}" \
    ${CAFFE_CMAKE_ARGS:-}
  # Caffe's CMake quietly builds without cuDNN when it finds none: refuse that.
  if ! grep -Eq '^CUDNN_LIBRARY:[A-Z]+=/' "$build/CMakeCache.txt" \
     || ! grep -Eq '^CUDNN_INCLUDE:[A-Z]+=/' "$build/CMakeCache.txt"; then
    die "cuDNN not found (CUDNN_INCLUDE, CUDNN_LIBRARY in $build/CMakeCache.txt)"
  fi
}

# Make the installed Caffe findable: its libraries by the dynamic linker,
# pycaffe by the system Python.
register() {
  echo "$prefix/lib" > /etc/ld.so.conf.d/caffe.conf
  ldconfig
  if [ "$build_python" = ON ]; then
    local site
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$site"
    echo "$prefix/python" > "$site/caffe.pth"
  fi
}

# The install must load, checked without a GPU (a docker build has none):
# the caffe binary starts, libcaffe links cuDNN and NCCL, pycaffe and the
# modules caffe-ft and users import (caffe.io, caffe.net_spec) import. No
# forward pass: BVLC Caffe builds cuDNN layers even in CPU mode, and they
# abort without a GPU (BVLC/caffe#3317, #3953). The forward pass on the GPU is
# `caffe-ft doctor`'s, which the GPU image runs when it starts.
smoke_test() {
  [ -x "$prefix/bin/caffe" ] || die "$prefix/bin/caffe missing"
  GLOG_minloglevel=2 "$prefix/bin/caffe" --version >&2 || die "$prefix/bin/caffe does not start"
  local lib needed want
  lib=$(find "$prefix/lib" -name 'libcaffe.so*' -type f | head -n1)
  [ -n "$lib" ] || die "no libcaffe.so under $prefix/lib"
  needed=$(readelf -d "$lib" | awk '/NEEDED/ { print $NF }')
  for want in libcudnn libnccl libcublas; do
    grep -q "\[$want" <<<"$needed" || die "$lib does not link $want"
  done
  # libcuda.so.1 comes with the driver, at run time only.
  if ldd "$lib" | grep 'not found' | grep -v 'libcuda\.so' >&2; then
    die "$lib needs libraries that are not installed"
  fi
  [ "$build_python" = ON ] || return 0
  GLOG_minloglevel=2 python3 - <<'EOF'
import caffe, caffe.io, caffe.net_spec
assert caffe.has_nccl(), "pycaffe was built without NCCL"
print("build-caffe-cuda: pycaffe", caffe.__file__, "imports (io, net_spec), has NCCL")
EOF
}

main() {
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || die "no nvcc: run on a CUDA devel image"
  export PATH="$PATH:/usr/local/cuda/bin"
  [ "$use_apt" -eq 0 ] || install_dependencies
  local cleanup=0
  if [ -z "$workdir" ]; then
    workdir=$(mktemp -d)
    cleanup=1
  fi
  mkdir -p "$workdir"
  unpack_source "$workdir/src"
  apply_patches "$workdir/src"
  configure "$workdir/src" "$workdir/build"
  log "build with $jobs jobs"
  cmake --build "$workdir/build" --parallel "$jobs"
  cmake --build "$workdir/build" --target install
  register
  smoke_test
  if [ "$cleanup" -eq 1 ]; then
    rm -rf "$workdir"
  fi
  log "done: $prefix"
}

main
