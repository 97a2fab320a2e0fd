#!/usr/bin/env bash
# Builds the Debian package of arcgate with dpkg-deb (no cargo-deb, no debhelper needed).
#
#   scripts/build-deb.sh [OUT_DIR]          # default OUT_DIR: target/debian
#
# Env:
#   ARCGATE_DEB_PROFILE   cargo profile to build (default: release, fat LTO, a few minutes)
#   ARCGATE_BIN           use this arcgate binary instead of building one
#   ARCGATE_LOAD_BIN      use this arcgate-load binary instead of building one
#   SOURCE_DATE_EPOCH     timestamps in the package (default: the last commit's date)
#   ARCGATE_DEB_MAINTAINER  "Name <email>" of whoever ships the package (the default is a
#                         placeholder that lintian calls bogus-mail-host: set yours)
#
# The package: /usr/bin/arcgate and arcgate-load, the systemd units and sysusers file, the
# commented configuration as a conffile (/etc/arcgate/arcgate.toml), the sysctl settings,
# bash/zsh/fish completions and man pages (from `arcgate generate-assets`), and the
# maintainer scripts of packaging/debian/ (their header says the enable/start policy).
# Prints the path of the .deb last.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir="$(pwd)"

out_dir="${1:-target/debian}"
profile="${ARCGATE_DEB_PROFILE:-release}"
log() { echo "[build-deb] $*" >&2; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
deb_version="${version}-1"
arch="$(dpkg --print-architecture)"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

bin="${ARCGATE_BIN:-}"
load_bin="${ARCGATE_LOAD_BIN:-}"
if [ -z "$bin" ] || [ -z "$load_bin" ]; then
    log "cargo build --profile $profile (arcgate, arcgate-load)"
    cargo build --profile "$profile" -p arcgate --bin arcgate -p arcgate-load --bin arcgate-load >&2
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    case "$profile" in dev | test) sub=debug ;; bench) sub=release ;; *) sub="$profile" ;; esac
    bin="${bin:-$target_dir/$sub/arcgate}"
    load_bin="${load_bin:-$target_dir/$sub/arcgate-load}"
fi
for b in "$bin" "$load_bin"; do
    [ -x "$b" ] || { log "not an executable: $b"; exit 1; }
done

work="$(mktemp -d -t arcgate-deb.XXXXXX)"
trap 'rm -rf "$work"' EXIT
pkg="$work/arcgate_${deb_version}_${arch}"
mkdir -p "$pkg/DEBIAN"

# --- files ---------------------------------------------------------------------------
install -D -m 0755 "$bin" "$pkg/usr/bin/arcgate"
install -D -m 0755 "$load_bin" "$pkg/usr/bin/arcgate-load"
if command -v strip >/dev/null 2>&1; then
    strip --strip-unneeded --remove-section=.comment --remove-section=.note \
        "$pkg/usr/bin/arcgate" "$pkg/usr/bin/arcgate-load"
fi
for unit in arcgate.service arcgate.socket; do
    # The units name /usr/local/bin for a hand install; the package installs to /usr/bin.
    sed 's#/usr/local/bin/arcgate#/usr/bin/arcgate#g' "systemd/$unit" >"$work/$unit"
    install -D -m 0644 "$work/$unit" "$pkg/usr/lib/systemd/system/$unit"
done
install -D -m 0644 systemd/arcgate.sysusers "$pkg/usr/lib/sysusers.d/arcgate.conf"
install -D -m 0644 packaging/sysctl.d/60-arcgate.conf "$pkg/usr/lib/sysctl.d/60-arcgate.conf"
# 0640 root:arcgate once the user exists (postinst); nobody else reads it meanwhile.
install -D -m 0640 packaging/arcgate.toml "$pkg/etc/arcgate/arcgate.toml"

"$pkg/usr/bin/arcgate" generate-assets "$work/assets" >/dev/null
install -D -m 0644 "$work/assets/completions/arcgate.bash" \
    "$pkg/usr/share/bash-completion/completions/arcgate"
install -D -m 0644 "$work/assets/completions/_arcgate" \
    "$pkg/usr/share/zsh/vendor-completions/_arcgate"
install -D -m 0644 "$work/assets/completions/arcgate.fish" \
    "$pkg/usr/share/fish/vendor_completions.d/arcgate.fish"
mkdir -p "$pkg/usr/share/man/man1"
for page in "$work"/assets/man/*.1; do
    gzip -9n <"$page" >"$pkg/usr/share/man/man1/$(basename "$page").gz"
done

doc="$pkg/usr/share/doc/arcgate"
mkdir -p "$doc"
{
    echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: arcgate"
    echo
    echo "Files: *"
    echo "Copyright: $(sed -n 's/^Copyright (c) //p' LICENSE | head -n1)"
    echo "License: MIT"
    sed -e 's/^$/./' -e 's/^/ /' LICENSE | sed -n '/Permission is hereby granted/,$p'
} >"$doc/copyright"
chmod 0644 "$doc/copyright"
maintainer="${ARCGATE_DEB_MAINTAINER:-arcgate maintainers <arcgate@localhost>}"
{
    echo "arcgate ($deb_version) unstable; urgency=medium"
    echo
    echo "  * Package of arcgate $version."
    echo
    echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"
# Deliberate departures from lintian's defaults, each with its reason.
install -D -m 0644 packaging/debian/lintian-overrides "$pkg/usr/share/lintian/overrides/arcgate"
for f in README.md docs/operations.md; do
    gzip -9n <"$f" >"$doc/$(basename "$f").gz"
done

# --- control -------------------------------------------------------------------------
depends="libc6"
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    mkdir -p "$work/shlibs/debian"
    printf 'Source: arcgate\n\nPackage: arcgate\nArchitecture: any\n' >"$work/shlibs/debian/control"
    if found="$(cd "$work/shlibs" && dpkg-shlibdeps -O "$pkg/usr/bin/arcgate" \
        "$pkg/usr/bin/arcgate-load" 2>/dev/null)"; then
        depends="${found#shlibs:Depends=}"
    fi
fi
installed_kib="$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)"
cat >"$pkg/DEBIAN/control" <<EOF
Package: arcgate
Version: $deb_version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_kib
Depends: $depends, adduser
Recommends: systemd
Section: net
Priority: optional
Description: thread-per-core io_uring WebSocket gateway for game-server panels
 arcgate keeps the WebSocket connections of game-server machine agents and of
 panel users, authenticates them with JWTs, relays agent events to the users
 who may see them and routes commands and their answers back. It runs one
 event loop per core on io_uring (epoll where io_uring is unavailable).
 .
 Includes the arcgate-load load generator, systemd units (socket activated,
 hardened), a live status page on the admin listener, shell completions and
 man pages.
EOF
echo /etc/arcgate/arcgate.toml >"$pkg/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$pkg/DEBIAN/$script"
done
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"
find "$pkg" -type d -exec chmod 0755 {} +
find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$out_dir"
deb="$(cd "$out_dir" && pwd)/arcgate_${deb_version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2
log "built $deb"
cd "$root_dir"
echo "$deb"
