#!/bin/bash
# apt-archive-fallback.sh: make `apt-get update` work on a Debian release whose
# suites have left the regular mirrors.
#
# Runs INSIDE the Debian system, as root (the Dockerfile runs it before the
# install scripts). It runs `apt-get update` with the sources as they are;
# only when that fails does it point every source at the Debian archive (the
# same path on the archive host that the regular mirror's domain names) with
# Release-file expiry checks off, and try again, without the -updates suite
# when the archive lacks it. Run again after apt-get clean, the later
# `apt-get update` of the install scripts then finds working sources.
#
# Environment: DEBIAN_ARCHIVE_URL  the archive's base URL (without /debian),
#   for when the sources' mirror is not one of Debian's own hosts.
set -euo pipefail

log() { printf 'apt-archive-fallback: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
export DEBIAN_FRONTEND=noninteractive
SOURCES=/etc/apt/sources.list

# apt-get update exits 0 when it cannot fetch (only warnings): look at what it says.
apt_update() {
  local err
  err=$(mktemp)
  if apt-get update -qq 2>"$err" && ! grep -qE '^(E:|W: Failed to fetch|W: Some index files failed)' "$err"; then
    rm -f "$err"
    return 0
  fi
  sed 's/^/  /' "$err" >&2
  rm -f "$err"
  return 1
}

if apt_update; then
  exit 0
fi
log "apt-get update failed with the regular sources (above)"
[ -f "$SOURCES" ] || die "no $SOURCES to rewrite"

# scheme://host/path -> the archive's URL for that path: DEBIAN_ARCHIVE_URL,
# else the host "archive." + the mirror's Debian domain.
archive_uri() {
  local uri=$1 scheme rest host path domain
  scheme=${uri%%://*}
  rest=${uri#*://}
  host=${rest%%/*}
  path=/${rest#*/}
  if [ -n "${DEBIAN_ARCHIVE_URL:-}" ]; then
    printf '%s%s\n' "${DEBIAN_ARCHIVE_URL%/}" "$path"
    return
  fi
  case "$host" in
    debian.org|*.debian.org) domain=debian.org ;;
    *) die "the mirror $host is not Debian's own: set DEBIAN_ARCHIVE_URL to the Debian archive's URL" ;;
  esac
  printf '%s://archive.%s%s\n' "$scheme" "$domain" "$path"
}

cp "$SOURCES" "$SOURCES.regular"
while read -r kind uri rest || [ -n "${kind:-}" ]; do
  case "$kind" in
    deb|deb-src) printf '%s %s %s\n' "$kind" "$(archive_uri "$uri")" "$rest" ;;
    *) printf '%s %s %s\n' "$kind" "$uri" "$rest" ;;
  esac
done <"$SOURCES.regular" >"$SOURCES"
# The archive's Release files are past their Valid-Until dates.
echo 'Acquire::Check-Valid-Until "false";' >/etc/apt/apt.conf.d/90archive-no-valid-until
log "trying the archive:"
sed 's/^/  /' "$SOURCES" >&2
if ! apt_update; then
  log "again without the -updates suite"
  sed -i '/-updates /d' "$SOURCES"
  apt_update || die "apt-get update fails on the archive too"
fi
log "apt sources now point at the archive"
