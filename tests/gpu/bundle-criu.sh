#!/usr/bin/env bash
# Bundle a CRIU binary with the libraries it links (and this host's loader) into a prefix that
# runs on another glibc host, the layout tests/gpu/run.sh wraps: PREFIX/root/usr/sbin/criu and
# PREFIX/root/usr/lib/<triplet>/. Used to carry fastboot's patched CRIU (built against this
# machine's libraries by provision-criu.sh) to a lent GPU machine:
#
#   tests/gpu/bundle-criu.sh /opt/fastboot/criu/bin/criu .cache/criu-mapped
set -euo pipefail
src=${1:?usage: bundle-criu.sh CRIU_BINARY PREFIX}
prefix=${2:?usage: bundle-criu.sh CRIU_BINARY PREFIX}
triplet=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
rm -rf "$prefix"
mkdir -p "$prefix/root/usr/sbin" "$prefix/root/usr/lib/$triplet"
cp "$src" "$prefix/root/usr/sbin/criu"
strip "$prefix/root/usr/sbin/criu" 2>/dev/null || true
# ldd lists "name => /path (addr)" for libraries and "/path/ld-linux... (addr)" for the loader
ldd "$src" | awk '/=> \//{print $3} $1 ~ /^\/.*ld-linux/{print $1}' | while read -r lib; do
    cp -L "$lib" "$prefix/root/usr/lib/$triplet/"
done
echo "bundle-criu: $("$src" --version | head -1) with $(ls "$prefix/root/usr/lib/$triplet" | wc -l) libraries in $prefix"
