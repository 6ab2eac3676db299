#!/usr/bin/env bash
# Provision a CRIU >= 4.2 for fastboot, idempotently.
#
# Usage: provision-criu.sh [PREFIX]     (default PREFIX: /opt/fastboot/criu)
#
# Preferred: CRIU built from Debian unstable's source with fastboot's patch
# (patches/criu-mmap-page-image.patch: `criu restore --mmap-page-image`, which maps page images
# copy-on-write instead of copying them, so many restores of one snapshot share its memory).
# The source tarball is checked against the SHA256 in Debian's signed Sources index; the build
# dependencies come from the system's apt (Debian/Ubuntu -dev packages). PREFIX/bin/criu is then
# a plain binary linked against the system's libraries.
#
# Fallback (the build failed, or FASTBOOT_CRIU_BUILD=0): a system criu >= 4.2 as it is, or
# Debian unstable's binary package with its own loader and libraries unpacked into PREFIX (Debian
# 12 ships 3.17, which fails on kernels >= 6.x with "Unexpected rt vDSO area bounds"; Debian 13
# ships 4.1.1, which cannot dump TCP sockets on kernels >= 6.16). The system libc is never
# replaced. Without the patch fastboot works the same; restores copy every page.
#
# fastboot finds PREFIX/bin/criu by itself; FASTBOOT_CRIU overrides it.
set -euo pipefail

prefix=${1:-/opt/fastboot/criu}
suite=${FASTBOOT_CRIU_SUITE:-sid}
min_major=4 min_minor=2
here=$(cd "$(dirname "$0")" && pwd)

version_ok() {  # version_ok CRIU_COMMAND... -> 0 when it prints "Version: X.Y" with X.Y >= 4.2
    local v
    v=$("$@" --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt "$min_major" ] || { [ "$1" -eq "$min_major" ] && [ "$2" -ge "$min_minor" ]; }
}
maps_pages() {  # maps_pages CRIU_COMMAND... -> 0 when it has fastboot's --mmap-page-image
    "$@" --help 2>&1 | grep -q -- '--mmap-page-image'
}
# In a checkout: patches/; installed: the package fastboot_patches next to fastboot/.
patch=$(ls "$here/../../patches/criu-mmap-page-image.patch" \
           "$here/../../fastboot_patches/criu-mmap-page-image.patch" 2>/dev/null | head -1 || true)
# The prefix records which patch it was built with, so a changed patch is rebuilt.
patch_sum=$([ -n "$patch" ] && sha256sum "$patch" | cut -c1-64 || true)

if command -v criu >/dev/null && version_ok criu && maps_pages criu; then
    echo "provision-criu: system $(command -v criu) is new enough and patched"
    exit 0
fi
if [ -x "$prefix/bin/criu" ] && version_ok "$prefix/bin/criu" && maps_pages "$prefix/bin/criu" \
   && [ "$(cat "$prefix/fastboot-patch.sha256" 2>/dev/null)" = "$patch_sum" ]; then
    echo "provision-criu: $prefix/bin/criu is ready ($("$prefix/bin/criu" --version | head -1), patched)"
    exit 0
fi

arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

. "$here/../debian-source.sh"  # private_apt, orig_source

# -- Preferred: the patched CRIU, built from source -------------------------------------------
build_deps=(gcc make pkg-config xz-utils patch curl protobuf-c-compiler libprotobuf-c-dev
            libprotobuf-dev protobuf-compiler libnl-3-dev libcap-dev libnet1-dev libbsd-dev
            uuid-dev libnftables-dev libgnutls28-dev)
build_patched() {
    local missing=() pkg
    [ -n "$patch" ] || { echo "provision-criu: fastboot's CRIU patch not found" >&2; return 1; }
    for pkg in "${build_deps[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "provision-criu: installing build dependencies: ${missing[*]}"
        apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || return 1
    fi
    echo "provision-criu: resolving criu's source from Debian $suite"
    orig_source criu "$work/src" || return 1
    (cd "$work/src" && patch -p1 --quiet < "$patch") || return 1
    echo "provision-criu: building $orig_file with fastboot's patch"
    make -C "$work/src" -j"$(nproc)" criu >"$work/build.log" 2>&1 \
        || { tail -20 "$work/build.log" >&2; return 1; }
    local staging="$prefix.new"
    rm -rf "$staging"
    mkdir -p "$staging/bin"
    install -m 0755 "$work/src/criu/criu" "$staging/bin/criu"
    echo "$patch_sum" > "$staging/fastboot-patch.sha256"
    { version_ok "$staging/bin/criu" && maps_pages "$staging/bin/criu"; } \
        || { echo "provision-criu: the built criu does not run" >&2; return 1; }
    rm -rf "$prefix"
    mv "$staging" "$prefix"
    echo "provision-criu: installed $("$prefix/bin/criu" --version | head -1) with fastboot's patch in $prefix"
}
if [ "${FASTBOOT_CRIU_BUILD:-1}" != 0 ]; then
    build_patched && exit 0
    echo "provision-criu: building the patched criu failed; falling back to Debian's binary" \
         "(restores will copy pages instead of sharing them)" >&2
fi

# -- Fallback: an unpatched CRIU >= 4.2 -------------------------------------------------------
if command -v criu >/dev/null && version_ok criu; then
    echo "provision-criu: system $(command -v criu) is new enough ($(criu --version | head -1))"
    exit 0
fi
if [ -x "$prefix/bin/criu" ] && version_ok "$prefix/bin/criu"; then
    echo "provision-criu: $prefix/bin/criu is ready ($("$prefix/bin/criu" --version | head -1))"
    exit 0
fi
case $arch in
    amd64) triplet=x86_64-linux-gnu loader=ld-linux-x86-64.so.2 ;;
    arm64) triplet=aarch64-linux-gnu loader=ld-linux-aarch64.so.1 ;;
    *) echo "provision-criu: unsupported architecture $arch" >&2; exit 1 ;;
esac
mkdir -p "$work"/debs
private_apt deb

echo "provision-criu: resolving criu from Debian $suite"
apt-get "${apt_opts[@]}" -qq update
# Every package criu needs, transitively: the libraries the binary links against plus the libc
# they were built for. Nothing else is taken from the suite.
mapfile -t pkgs < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances criu | grep -v '^ ' | grep -v '^<' | sort -u)
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${pkgs[@]}")

staging="$prefix.new"
rm -rf "$staging"
mkdir -p "$staging/root" "$staging/bin"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$staging/root"; done
# Debian is merged-/usr: every library of these packages lands in usr/lib/<triplet>.
libdir="$prefix/root/usr/lib/$triplet"
cat > "$staging/bin/criu" <<WRAP
#!/bin/sh
# criu from Debian $suite, run with its own loader and libraries (see fastboot/snapshot/provision-criu.sh).
exec "$libdir/$loader" --library-path "$libdir" \\
    "$prefix/root/usr/sbin/criu" "\$@"
WRAP
chmod 0755 "$staging/bin/criu"
rm -rf "$prefix"
mv "$staging" "$prefix"
if ! version_ok "$prefix/bin/criu"; then
    echo "provision-criu: $prefix/bin/criu does not run:" >&2
    "$prefix/bin/criu" --version >&2 || true
    exit 1
fi
echo "provision-criu: installed $("$prefix/bin/criu" --version | head -1) in $prefix"
