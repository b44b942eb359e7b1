#!/usr/bin/env bash
# Builds the packages: target/packages/keysync_<version>-<rev>_<arch>.deb and
# target/packages/keysync-<version>-<rev>.<arch>.rpm, and prints both paths.
# (Not cargo-deb's target/debian/: it deletes other versions there.)
#
#   packaging/build.sh [REVISION...]   (default 1; .ci/packaging builds 1 2:
#                                       revision 2 is an "upgrade" made from
#                                       the same binary)
#
# Needs cargo-deb and cargo-generate-rpm (.ci/packaging installs pinned
# versions). The release binary is built once and shared by both packages;
# the man pages and completions come from examples/gen-assets, i.e. from the
# real clap definition in src/cli/mod.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
revs=("${@:-1}")

cargo build --release --locked --bin keysync
rm -rf target/packaging-assets
cargo run --quiet --locked --example gen-assets -- target/packaging-assets >/dev/null
# cargo-deb gzips man pages itself; the .rpm gets these (rpmbuild would).
gzip -9nk target/packaging-assets/man/*.1

# --no-build: the binary above; cargo-deb would otherwise build it again.
# dpkg-shlibdeps (dpkg-dev) computes Depends from the binary's libraries.
rm -rf target/packages
mkdir -p target/packages
for rev in "${revs[@]}"; do
    cargo deb --quiet --no-build --locked --deb-revision "$rev" --output "target/packages/keysync.deb.tmp" >/dev/null
    version=$(dpkg-deb -f target/packages/keysync.deb.tmp Version)
    arch=$(dpkg-deb -f target/packages/keysync.deb.tmp Architecture)
    deb="target/packages/keysync_${version}_${arch}.deb"
    mv -f target/packages/keysync.deb.tmp "$deb"

    rm -rf target/generate-rpm
    cargo generate-rpm --set-metadata "release = \"$rev\""
    rpm=$(find target/generate-rpm -name "keysync-*-$rev.*.rpm")
    mv -f "$rpm" target/packages/
    echo "$deb"
    echo "target/packages/$(basename "$rpm")"
done
