# shellcheck shell=bash
# What this host's apt knows, for building Debian roots and images that reach
# their mirror the way the host does (sourced by scripts/caffe-env and
# scripts/build-image; no mirror is ever named here).

# First URI of this host's apt sources whose path ends in /$1 (debian or
# debian-security), from deb822 *.sources files or one-line *.list files.
host_apt_uri() {
  local suffix=$1 f
  {
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] && awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] && sed -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" { print $2 }'
    done
  } | sed 's:/*$::' | grep -m1 -E "/$suffix\$" || true
}

# copy_apt_conf DIR: copy the host's apt files that hold Acquire:: settings
# (proxy, validity checks of the mirror's Release files, ...) into DIR (a
# root's /etc/apt/apt.conf.d).
copy_apt_conf() {
  local dest=$1 f
  for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
    if [ -f "$f" ] && grep -q 'Acquire::' "$f"; then
      cp "$f" "$dest/$(basename "$f")"
    fi
  done
}

# The host's apt HTTP proxy (Acquire::http::Proxy), empty when none.
host_apt_proxy() {
  local http_proxy_conf=""
  eval "$(apt-config shell http_proxy_conf Acquire::http::Proxy 2>/dev/null)"
  printf '%s' "$http_proxy_conf"
}

# write_sources ROOT SUITE MIRROR [SECURITY]: the root's sources.list.
write_sources() {
  local root=$1 suite=$2 mirror=$3 security=${4:-}
  {
    echo "deb $mirror $suite main"
    echo "deb $mirror $suite-updates main"
    [ -z "$security" ] || echo "deb $security $suite-security main"
  } >"$root/etc/apt/sources.list"
}
