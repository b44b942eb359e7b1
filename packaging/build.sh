#!/usr/bin/env bash
# Builds the packages: TARGET/packages/keysync_<version>-<rev>_<arch>.deb and
# TARGET/packages/keysync-<version>-<rev>.<arch>.rpm, and prints both paths.
# TARGET is cargo's target directory: ./target, or wherever CARGO_TARGET_DIR
# (or build.target-dir) puts it. (Not cargo-deb's TARGET/debian/: it deletes
# other versions there.)
#
#   packaging/build.sh [REVISION...]   (default 1; .ci/packaging builds 1 2:
#                                       revision 2 is an "upgrade" made from
#                                       the same binary)
#
# Needs cargo-deb and cargo-generate-rpm (.ci/packaging installs pinned
# versions). The release binaries (the agent, and the front statically
# linked by packaging/front.sh) are built once and shared by both packages;
# the man pages and completions come from examples/gen-assets, i.e. from the
# real clap definition in src/cli/mod.rs.
#
# Asset paths in Cargo.toml start with target/release/: both tools treat that
# prefix as "the real target directory" (cargo-deb asks cargo metadata,
# cargo-generate-rpm takes --target-dir), so the generated assets live in
# TARGET/release/packaging-assets and every path below follows $target.
set -euo pipefail
cd "$(dirname "$0")/.."
revs=("${@:-1}")

# cargo's answer, so a target-dir from CARGO_TARGET_DIR, CARGO_BUILD_TARGET_DIR
# or .cargo/config.toml all work; cargo-deb uses the same one itself.
target=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || { echo "build.sh: cannot find cargo's target directory" >&2; exit 1; }
assets=$target/release/packaging-assets
out=$target/packages

cargo build --release --locked --bins
# The front binary as the packages ship it: statically linked.
bash packaging/front.sh --locked --quiet
rm -rf "$assets"
cargo run --quiet --locked --example gen-assets -- "$assets" >/dev/null
# Both packages get these (rpmbuild would gzip them; cargo-deb would too,
# but not under target/release/, which it takes for build products).
gzip -9nk "$assets"/man/*.1

# --no-build: the binary above; cargo-deb would otherwise build it again.
# dpkg-shlibdeps (dpkg-dev) computes Depends from the binary's libraries.
rm -rf "$out"
mkdir -p "$out"
for rev in "${revs[@]}"; do
    cargo deb --quiet --no-build --locked --deb-revision "$rev" --output "$out/keysync.deb.tmp" >/dev/null
    version=$(dpkg-deb -f "$out/keysync.deb.tmp" Version)
    arch=$(dpkg-deb -f "$out/keysync.deb.tmp" Architecture)
    deb="$out/keysync_${version}_${arch}.deb"
    mv -f "$out/keysync.deb.tmp" "$deb"

    # cargo-generate-rpm reads CARGO_TARGET_DIR but not .cargo/config.toml;
    # --target-dir makes it use exactly cargo's directory.
    rm -rf "$target/generate-rpm"
    cargo generate-rpm --target-dir "$target" --set-metadata "release = \"$rev\""
    rpm=$(find "$target/generate-rpm" -name "keysync-*-$rev.*.rpm")
    mv -f "$rpm" "$out/"
    echo "$deb"
    echo "$out/$(basename "$rpm")"
done
