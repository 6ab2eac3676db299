#!/usr/bin/env bash
# Provision a CRIU >= 4.2 for fastboot, idempotently.
#
# Usage: scripts/provision-criu [PREFIX]     (default PREFIX: /opt/fastboot/criu)
#
# A system criu >= 4.2 is used as it is. Otherwise (Debian 12 ships 3.17, which fails on kernels
# >= 6.x with "Unexpected rt vDSO area bounds"; Debian 13 ships 4.1.1, which cannot dump TCP
# sockets on kernels >= 6.16), criu and the exact libraries it links against are taken from
# Debian unstable with a private apt configuration (the system's apt sources are untouched) and
# unpacked into PREFIX. The system libc is never replaced: PREFIX/bin/criu runs the packaged
# binary through the prefix's own dynamic loader. fastboot finds PREFIX/bin/criu by itself;
# FASTBOOT_CRIU overrides it.
set -euo pipefail

prefix=${1:-/opt/fastboot/criu}
suite=${FASTBOOT_CRIU_SUITE:-sid}
min_major=4 min_minor=2

version_ok() {  # version_ok CRIU_COMMAND... -> 0 when it prints "Version: X.Y" with X.Y >= 4.2
    local v
    v=$("$@" --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt "$min_major" ] || { [ "$1" -eq "$min_major" ] && [ "$2" -ge "$min_minor" ]; }
}

if command -v criu >/dev/null && version_ok criu; then
    echo "provision-criu: system $(command -v criu) is new enough ($(criu --version | head -1))"
    exit 0
fi
if [ -x "$prefix/bin/criu" ] && version_ok "$prefix/bin/criu"; then
    echo "provision-criu: $prefix/bin/criu is ready ($("$prefix/bin/criu" --version | head -1))"
    exit 0
fi

arch=$(dpkg --print-architecture)
case $arch in
    amd64) triplet=x86_64-linux-gnu loader=ld-linux-x86-64.so.2 ;;
    arm64) triplet=aarch64-linux-gnu loader=ld-linux-aarch64.so.1 ;;
    *) echo "provision-criu: unsupported architecture $arch" >&2; exit 1 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/etc/sources.list.d "$work"/etc/preferences.d "$work"/state/lists/partial \
         "$work"/cache/archives/partial "$work"/debs
touch "$work"/state/status
cat > "$work"/etc/sources.list.d/criu.sources <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_opts=(-o "Dir::Etc=$work/etc" -o Dir::Etc::SourceList=/dev/null
          -o "Dir::Etc::SourceParts=$work/etc/sources.list.d" -o "Dir::State=$work/state"
          -o "Dir::State::status=$work/state/status" -o "Dir::Cache=$work/cache"
          -o "APT::Architecture=$arch" -o "APT::Architectures=$arch" -o APT::Sandbox::User=root)

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
# criu from Debian $suite, run with its own loader and libraries (see scripts/provision-criu).
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
