# shellcheck shell=bash
# Docker or buildah, for scripts/build-image and scripts/run-image.
#   select_engine   sets ENGINE (docker where a daemon answers, else buildah,
#                   installing buildah with apt when missing)
#   bh ARGS…        buildah on caffe-ft's own image store in CAFFE_FT_IMAGES
#   image_exists IMAGE, image_tag IMAGE NEW
CAFFE_FT_IMAGES=${CAFFE_FT_IMAGES:-/var/cache/caffe-ft/images}

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# vfs: works in any container or VM without overlay or fuse support.
bh() {
  buildah --root "$CAFFE_FT_IMAGES/storage" --runroot "/run/caffe-ft-buildah" \
    --storage-driver vfs "$@"
}

select_engine() {
  ENGINE=${CAFFE_FT_IMAGE_ENGINE:-}
  if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
      ENGINE=docker
    else
      ENGINE=buildah
    fi
  fi
  case "$ENGINE" in
    docker) ;;
    buildah)
      if ! command -v buildah >/dev/null; then
        if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
          die "no Docker daemon answers and buildah is missing: install buildah"
        fi
        log "installing buildah"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null
      fi ;;
    *) die "CAFFE_FT_IMAGE_ENGINE must be docker or buildah (got '$ENGINE')" ;;
  esac
}

image_exists() {
  if [ "$ENGINE" = docker ]; then
    docker image inspect "$1" >/dev/null 2>&1
  else
    bh inspect --type image "$1" >/dev/null 2>&1
  fi
}

image_tag() {
  if [ "$ENGINE" = docker ]; then docker tag "$1" "$2"; else bh tag "$1" "$2"; fi
}
