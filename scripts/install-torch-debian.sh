#!/bin/bash
# Install caffe-ft with its PyTorch engine on Debian or Ubuntu, in a virtual
# environment (Debian 12's and Ubuntu 24.04's Python is "externally managed").
#
# Runs as root: the Dockerfile's torch-gpu target runs it, and so can a GPU
# host directly. PyPI's torch wheels for Linux x86-64 carry their CUDA, cuDNN
# and NCCL libraries: the host needs only the NVIDIA driver.
#
# Usage: install-torch-debian.sh [--venv DIR] [--torch SPEC] [SOURCE]
#   SOURCE        caffe-ft to install: a source tree, a wheel or 'caffe-ft'
#                 (without it: Python and torch only, e.g. for an image layer)
#   --venv DIR    where (default /opt/caffe-ft; its bin/ holds caffe-ft)
#   --torch SPEC  the torch requirement (default 'torch'; e.g. torch==2.13.0+cpu
#                 with PIP_FIND_LINKS naming a folder of wheels)
set -euo pipefail

log() { printf 'install-torch-debian: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

venv=/opt/caffe-ft
torch_spec=torch
source=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; venv=$2; shift 2 ;;
    --torch) [ $# -ge 2 ] || die "--torch needs a requirement"; torch_spec=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) die "unknown option: $1" ;;
    *) [ -z "$source" ] || die "one SOURCE only"; source=$1; shift ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "must run as root"

export DEBIAN_FRONTEND=noninteractive
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  log "apt-get install python3 python3-venv"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ca-certificates python3 python3-venv >/dev/null
  apt-get clean
  rm -rf /var/lib/apt/lists/*
fi

if [ ! -x "$venv/bin/python" ]; then
  log "virtual environment $venv ($(python3 --version))"
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --no-cache-dir)
log "pip install $torch_spec"
"${pip[@]}" "$torch_spec"
if [ -z "$source" ]; then
  log "done: torch in $venv (no caffe-ft SOURCE given)"
  exit 0
fi
# The extra brings opencv-python-headless and lmdb (and torch, already there).
case "$source" in
  caffe-ft*|*.whl) target="$source" ;;
  *) target="$(cd "$source" && pwd -P)" ;;
esac
log "pip install caffe-ft[torch] from $source"
"${pip[@]}" "${target}[torch]"
"$venv/bin/caffe-ft" --version >&2
"$venv/bin/python" -c 'import torch, cv2, caffe_ft; print("install-torch-debian: torch", torch.__version__, "CUDA", torch.version.cuda)' >&2
log "done: $venv/bin/caffe-ft"
