#!/usr/bin/env bash
# Usage: scripts/image-base.sh [CACHE_DIR]   (default build/image-cache; needs root, debootstrap, podman)
# Makes the Dockerfile's base image, debian:12, from the Debian mirror when no container registry is reachable
# (these machines reach Debian and PyPI only): debootstrap a bookworm minbase root with the same apt sources as
# Docker Hub's debian:12 (bookworm, bookworm-updates, bookworm-security), and import it into podman under the
# name the Dockerfile's FROM resolves to with --pull=never. The root is cached as a tarball; re-runs import it.
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${1:-$root/build/image-cache}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
tag=docker.io/library/debian:12
tarball="$cache/debian-12-minbase.tar"

step() { printf '[image-base] %s\n' "$*" >&2; }

if podman image exists "$tag"; then
  step "$tag present"
  exit 0
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  t0=$SECONDS
  step "debootstrap bookworm minbase from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # Docker Hub's debian:12 layout: deb822 sources with updates and security, no package lists kept.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  step "root filesystem made in $((SECONDS - t0)) s ($(du -h "$tarball" | cut -f1))"
fi
podman import --change 'CMD ["bash"]' "$tarball" "$tag" >/dev/null
step "imported $tag"
