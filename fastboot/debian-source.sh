# Sourced by fastboot's provision scripts (snapshot/provision-criu.sh, imagefs/provision-fuse.sh):
# a private apt index of one Debian suite, and an upstream source tarball checked against the
# SHA256 that Debian's signed Sources index gives for it. The system's apt sources and state are
# never touched. Needs $work (a temp dir), $suite and $arch; `private_apt` sets apt_opts.

private_apt() {  # private_apt TYPE: apt_opts for a private index of Debian $suite (deb, deb-src)
    local dir="$work/apt-$1"
    mkdir -p "$dir"/etc/sources.list.d "$dir"/etc/preferences.d "$dir"/state/lists/partial \
             "$dir"/cache/archives/partial
    touch "$dir"/state/status
    cat > "$dir"/etc/sources.list.d/fastboot.sources <<SRC
Types: $1
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_opts=(-o "Dir::Etc=$dir/etc" -o Dir::Etc::SourceList=/dev/null
              -o "Dir::Etc::SourceParts=$dir/etc/sources.list.d" -o "Dir::State=$dir/state"
              -o "Dir::State::status=$dir/state/status" -o "Dir::Cache=$dir/cache"
              -o "APT::Architecture=$arch" -o "APT::Architectures=$arch" -o APT::Sandbox::User=root)
}

orig_source() {  # orig_source PACKAGE DEST: the verified upstream tarball, unpacked into DEST
    local uri file size sum
    private_apt deb-src
    apt-get "${apt_opts[@]}" -qq update || return 1
    # Only the upstream tarball (Debian's packaging is not needed).
    read -r uri file size sum < <(cd "$work" && apt-get "${apt_opts[@]}" --print-uris -qq source "$1" \
        | tr -d "'" | awk '$2 ~ /\.orig\.tar\.[a-z0-9]+$/' | head -1) || return 1
    [ -n "${uri:-}" ] && [ "${sum#SHA256:}" != "$sum" ] \
        || { echo "no $1 source with a SHA256 in Debian $suite" >&2; return 1; }
    curl -fsSL --retry 3 -o "$work/$file" "$uri" || return 1
    [ "$(stat -c %s "$work/$file")" = "$size" ] || { echo "$file: wrong size" >&2; return 1; }
    echo "${sum#SHA256:}  $work/$file" | sha256sum -c --quiet - || return 1
    mkdir -p "$2"
    tar -xf "$work/$file" -C "$2" --strip-components=1 || return 1
    orig_file=$file  # for the caller's messages
}
