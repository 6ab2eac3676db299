#!/usr/bin/env bash
# Give ImageFS FUSE passthrough, idempotently: libfuse >= 3.16 and a pyfuse3 that can use it.
#
# Usage: provision-fuse.sh PYTHON [PREFIX]     (default PREFIX: /opt/fastboot/fuse)
#
# Passthrough lets the kernel serve reads and mmaps of a fully local file straight from a backing
# file on local disk (ext4's large folios, no daemon), which is what warm reads need
# (docs/imagefs.md). The kernel has had it since 6.9; Debian 12's libfuse (3.14) and pyfuse3 3.5
# do not. So:
#   1. libfuse from Debian unstable's source (the tarball checked against the SHA256 in Debian's
#      signed Sources index), built with meson into PREFIX (the system's libfuse is untouched);
#   2. pyfuse3 3.5.0's sdist from PyPI (pinned by SHA256) with patches/pyfuse3-passthrough.patch
#      and patches/pyfuse3-read-nogil.patch (read replies sent without the GIL, so the kernel's
#      copy of a reply does not stop the daemon's fetch threads), built against PREFIX (rpath)
#      and installed into PYTHON's environment.
# On any failure the installed pyfuse3 stays as it was and ImageFS serves every read itself
# (exit 0 with a warning): passthrough is a speed-up, never a requirement.
set -euo pipefail

python=${1:?usage: provision-fuse.sh PYTHON [PREFIX]}
prefix=${2:-/opt/fastboot/fuse}
suite=${FASTBOOT_FUSE_SUITE:-sid}
pyfuse3_version=3.5.0
pyfuse3_sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
here=$(cd "$(dirname "$0")" && pwd)
# In a checkout: patches/; installed: the package fastboot_patches next to fastboot/.
patch_dir=$(ls -d "$here/../../patches" "$here/../../fastboot_patches" 2>/dev/null | head -1 || true)
patches=()  # applied in this order
for name in pyfuse3-passthrough.patch pyfuse3-read-nogil.patch; do
    [ -f "$patch_dir/$name" ] && patches+=("$patch_dir/$name")
done
patch_sums=$([ ${#patches[@]} -gt 0 ] && cat "${patches[@]}" | sha256sum | cut -c1-64 || true)
stamp_want="$pyfuse3_version $patch_sums $prefix"

log() { printf 'provision-fuse: %s\n' "$*"; }
has_patched_build() {  # the environment's pyfuse3 has both patches and links PREFIX's libfuse
    "$python" - "$prefix" <<'PY' 2>/dev/null
import sys, pyfuse3, pathlib
lib = pathlib.Path(pyfuse3.__file__).read_bytes()
ok = (
    hasattr(pyfuse3, "get_session_fd")
    and getattr(pyfuse3, "READ_REPLY_RELEASES_GIL", False)
    and sys.argv[1].encode() in lib
)
sys.exit(0 if ok else 1)
PY
}
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
stamp="$site/.fastboot-pyfuse3-passthrough"
if has_patched_build && [ "$(cat "$stamp" 2>/dev/null)" = "$stamp_want" ]; then
    log "pyfuse3 with passthrough and read-nogil is installed (libfuse in $prefix)"
    exit 0
fi
[ ${#patches[@]} -eq 2 ] || { log "pyfuse3 patches not found in patches/; no passthrough" >&2; exit 0; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
arch=$(dpkg --print-architecture)
. "$here/../debian-source.sh"  # private_apt, orig_source

build_libfuse() {
    if [ -f "$prefix/lib/pkgconfig/fuse3.pc" ] && [ "$(cat "$prefix/fastboot-suite" 2>/dev/null)" = "$suite" ]; then
        return 0
    fi
    local need=() pkg
    for pkg in meson ninja-build pkg-config gcc curl; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing build tools: ${need[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${need[@]}" >/dev/null || return 1
    fi
    log "resolving libfuse's source from Debian $suite"
    orig_source fuse3 "$work/libfuse" || return 1
    log "building $orig_file into $prefix"
    rm -rf "$prefix.new"
    (cd "$work/libfuse" \
        && meson setup build --prefix="$prefix.new" --libdir=lib -Dexamples=false -Dutils=false \
               -Dtests=false -Ddisable-mtab=true \
        && ninja -C build install) >"$work/libfuse.log" 2>&1 || { tail -20 "$work/libfuse.log" >&2; return 1; }
    # meson wrote PREFIX.new into fuse3.pc; the library goes live at PREFIX
    sed -i "s#$prefix.new#$prefix#g" "$prefix.new/lib/pkgconfig/fuse3.pc"
    echo "$suite" > "$prefix.new/fastboot-suite"
    rm -rf "$prefix"
    mv "$prefix.new" "$prefix"
}

build_pyfuse3() {
    local sdist="$work/pyfuse3-$pyfuse3_version.tar.gz"
    "$python" -m pip download -q --no-deps --no-binary :all: -d "$work" \
        "pyfuse3==$pyfuse3_version" >"$work/pip.log" 2>&1 || { tail -5 "$work/pip.log" >&2; return 1; }
    echo "$pyfuse3_sha256  $sdist" | sha256sum -c --quiet - || return 1
    tar -xzf "$sdist" -C "$work"
    local p
    for p in "${patches[@]}"; do
        (cd "$work/pyfuse3-$pyfuse3_version" && patch -p1 --quiet < "$p") || return 1
    done
    log "building pyfuse3 $pyfuse3_version with the passthrough and read-nogil patches against $prefix"
    PKG_CONFIG_PATH="$prefix/lib/pkgconfig" LDFLAGS="-Wl,-rpath,$prefix/lib" \
        "$python" -m pip wheel -q --no-deps -w "$work/wheels" "$work/pyfuse3-$pyfuse3_version" \
        >"$work/wheel.log" 2>&1 || { tail -20 "$work/wheel.log" >&2; return 1; }
    # --no-deps keeps --force-reinstall to pyfuse3 itself; trio is its one dependency
    "$python" -m pip install -q "trio >= 0.15" >"$work/install.log" 2>&1 \
        && "$python" -m pip install -q --force-reinstall --no-deps "$work"/wheels/pyfuse3-*.whl \
        >>"$work/install.log" 2>&1 || { tail -5 "$work/install.log" >&2; return 1; }
}

if build_libfuse && build_pyfuse3 && has_patched_build; then
    echo "$stamp_want" > "$stamp"
    version=$(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --modversion fuse3 || true)
    log "pyfuse3 $pyfuse3_version with passthrough and read-nogil installed (libfuse $version in $prefix)"
else
    log "WARNING: FUSE passthrough could not be provisioned; ImageFS will serve every read itself" >&2
fi
