#!/usr/bin/env bash
# Builds the front binary (src/bin/keysync-front.rs, /usr/bin/keysync in the
# packages) the way the packages ship it: statically linked, as a static
# PIE, into TARGET/release/keysync-front. sshd runs it for every key a
# client offers; without the dynamic loader (libc.so, libgcc_s.so, symbol
# binding) it starts faster than `cat` (docs/benchmarks.md, "The hook").
#
#   packaging/front.sh [CARGO ARGS...]    e.g. --locked, --quiet
#
# Only this binary: the agent binary stays dynamically linked, because it
# resolves users and host names through glibc's NSS (LDAP or sssd users,
# /etc/hosts), which a static glibc cannot load reliably. The front looks
# up neither. `cargo rustc` passes the flag to the final crate only, so the
# library and every dependency are the ones `cargo build --release` built;
# a later `cargo build --release` relinks the front dynamically (the same
# code, only slower to start), which is why packaging/build.sh and
# bench/hook.sh call this after their builds.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo rustc --release --bin keysync-front "$@" -- -C target-feature=+crt-static
