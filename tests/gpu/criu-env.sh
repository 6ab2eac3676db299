# Sourced by the lent-GPU scripts: sets FASTBOOT_CRIU to a CRIU >= 4.2 they can run.
#
# A system criu >= 4.2 as it is; else the first carried prefix found (FASTBOOT_GPU_CRIU_PREFIX,
# .cache/criu, /opt/fastboot/criu). A prefix's own bin/criu names absolute paths of the machine
# it was built on, so a wrapper is written that runs PREFIX/root/usr/sbin/criu with the
# prefix's loader and libraries wherever the prefix now is (tests/gpu/bundle-criu.sh makes one).
if [ -z "${FASTBOOT_CRIU:-}" ] && ! { command -v criu >/dev/null && criu --version | grep -qE 'Version: (4\.([2-9]|[1-9][0-9])|[5-9])'; }; then
    for prefix in ${FASTBOOT_GPU_CRIU_PREFIX:-} "$repo/.cache/criu" /opt/fastboot/criu; do
        [ -d "$prefix/root" ] || continue
        lib=$(ls -d "$prefix"/root/usr/lib/*-linux-gnu | head -1)
        loader=$(ls "$lib"/ld-linux-*.so.* | head -1)
        wrapper=$(mktemp -d)/criu
        printf '#!/bin/sh\nexec "%s" --library-path "%s" "%s/root/usr/sbin/criu" "$@"\n' \
            "$loader" "$lib" "$prefix" >"$wrapper"
        chmod +x "$wrapper"
        export FASTBOOT_CRIU=$wrapper
        break
    done
fi
