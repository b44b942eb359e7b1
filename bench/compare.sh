#!/usr/bin/env bash
# Runs parts of the benchmark suite for two revisions in one session, the
# parts interleaved (A's part, then B's, then the next part), so both meet
# the same machine:
#
#   bash bench/compare.sh REV [PART ...]     # default parts: sync_pass propagation idle hook
#
# REV (for example the commit before a change) is checked out in a
# temporary worktree and benchmarked with its own bench/run.sh; this tree
# is benchmarked as it is. Each revision builds in its own target dir. The
# two reports go to target/bench-compare/{base,this}-PART.md and are
# printed one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 1 ] || { echo "usage: bash bench/compare.sh REV [PART ...]" >&2; exit 2; }
rev=$1
shift
if [ $# -gt 0 ]; then parts=("$@"); else parts=(sync_pass propagation idle hook); fi
git rev-parse --verify --quiet "$rev^{commit}" > /dev/null || { echo "not a commit: $rev" >&2; exit 2; }

out=target/bench-compare
mkdir -p "$out"
base=$(mktemp -d /tmp/keysync-bench-base.XXXXXX)
cleanup() {
    git worktree remove --force "$base" 2>/dev/null || rm -rf "$base"
}
trap cleanup EXIT
git worktree add --quiet --detach "$base" "$rev"

for p in "${parts[@]}"; do
    echo "== $p at $rev" >&2
    (cd "$base" && env -u CARGO_TARGET_DIR bash bench/run.sh "$p" > /dev/null)
    cp "$base/target/bench-results.md" "$out/base-$p.md"
    echo "== $p at this tree" >&2
    bash bench/run.sh "$p" > /dev/null
    cp target/bench-results.md "$out/this-$p.md"
done

for p in "${parts[@]}"; do
    echo "# $p: $rev ($(git rev-parse --short "$rev"))"
    cat "$out/base-$p.md"
    echo
    echo "# $p: this tree ($(git rev-parse --short HEAD))"
    cat "$out/this-$p.md"
    echo
done
