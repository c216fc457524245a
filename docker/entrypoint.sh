#!/bin/sh
# caffe-ft-start: the GPU images' entrypoint. Checks with `caffe-ft doctor`
# that the engine can train here (on a GPU host: a forward pass on GPU 0, the
# test an image build without a GPU cannot run), then runs caffe-ft with the
# container's arguments. The report is printed only when the check fails.
#   CAFFE_FT_ENGINE        engine to check (pycaffe or torch; the image sets it)
#   CAFFE_FT_SKIP_DOCTOR=1 skip the check
set -eu
if [ "${CAFFE_FT_SKIP_DOCTOR:-0}" != 1 ] && [ "${1:-}" != doctor ]; then
  if ! report=$(caffe-ft doctor --engine "${CAFFE_FT_ENGINE:-auto}" 2>&1); then
    printf '%s\n' "$report" >&2
    echo "caffe-ft-start: this container cannot train with ${CAFFE_FT_ENGINE:-auto} here (set CAFFE_FT_SKIP_DOCTOR=1 to go on anyway)" >&2
    exit 1
  fi
fi
exec caffe-ft "$@"
