#!/usr/bin/env bash
# Builds the Debian package: packaging/deb/build.sh [OUT_DIR]
#
# A release build of hooktrail, the systemd unit, the sysusers and tmpfiles
# snippets and a default /etc/hooktrail/hooktrail.toml (a conffile), put
# together with dpkg-deb; no cargo plugin needed. Prints the .deb's path.
# Install with `sudo dpkg -i hooktrail_<version>_<arch>.deb`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:-$ROOT/target/debian}
cd "$ROOT"

cargo build --release --locked --bin hooktrail >&2
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/hooktrail_${version}_${arch}"

install -D -m 0755 target/release/hooktrail "$pkg/usr/bin/hooktrail"
strip --strip-debug "$pkg/usr/bin/hooktrail" 2>/dev/null || true
# The unit as shipped in systemd/, with the packaged binary's path.
install -d "$pkg/lib/systemd/system"
sed 's|^ExecStart=/usr/local/bin/hooktrail |ExecStart=/usr/bin/hooktrail |' systemd/hooktrail.service > "$pkg/lib/systemd/system/hooktrail.service"
grep -qx 'ExecStart=/usr/bin/hooktrail serve' "$pkg/lib/systemd/system/hooktrail.service"
install -D -m 0644 systemd/hooktrail.sysusers "$pkg/usr/lib/sysusers.d/hooktrail.conf"
install -D -m 0644 systemd/hooktrail.tmpfiles "$pkg/usr/lib/tmpfiles.d/hooktrail.conf"
install -D -m 0640 packaging/deb/hooktrail.toml "$pkg/etc/hooktrail/hooktrail.toml"
install -D -m 0644 README.md "$pkg/usr/share/doc/hooktrail/README.md"
install -D -m 0644 SECURITY.md "$pkg/usr/share/doc/hooktrail/SECURITY.md"

install -d "$pkg/DEBIAN"
echo /etc/hooktrail/hooktrail.toml > "$pkg/DEBIAN/conffiles"
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: hooktrail
Version: $version
Architecture: $arch
Maintainer: hooktrail developers <hooktrail@localhost>
Section: net
Priority: optional
Depends: libc6
Recommends: systemd
Installed-Size: $(du -sk "$pkg/usr" | cut -f1)
Description: webhook receiver with a durable queue and a paper trail
 hooktrail receives webhooks, writes each one durably to an event queue
 before answering, then processes them with shell, HTTP-forward and CRM
 upsert handlers, recording the outcome of every attempt.
CONTROL
install -m 0755 packaging/deb/postinst "$pkg/DEBIAN/postinst"
install -m 0755 packaging/deb/postrm "$pkg/DEBIAN/postrm"

mkdir -p "$OUT"
dpkg-deb --root-owner-group --build "$pkg" "$OUT/hooktrail_${version}_${arch}.deb" >&2
echo "$OUT/hooktrail_${version}_${arch}.deb"
