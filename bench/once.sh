#!/usr/bin/env bash
# One sync pass as a whole process (DESIGN.md §9): `keysync run --once` with
# 10,000 keys against `ssh-keygen -l -f` over the same keys, both whole
# processes, interleaved (keysync, ssh-keygen, ssh-keygen, keysync, ...) so
# drift in machine load touches both alike. Target: no slower (ratio ≤ 1).
#
#   bash bench/once.sh              # from the repo root; needs cargo, python3, ssh-keygen
#   KEYS=10000 RUNS=40 bash bench/once.sh
#
# The pass reads the list as the control plane's JSON from a file source,
# validates every key, renders, and writes the cache, the state and the
# managed block with fsync, from a fresh state dir each run (a new
# instance: every file is written); `rm -rf` of the previous run's dirs is
# part of the timed command. Logs go to /dev/null.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-10000}
RUNS=${RUNS:-40}
command -v ssh-keygen >/dev/null || { echo "bench/once.sh needs ssh-keygen (openssh-client)" >&2; exit 2; }
echo "== building the release binary" >&2
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/keysync
work=$(mktemp -d /tmp/keysync-once.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work" "$KEYS" <<'PY'
import base64, json, os, struct, sys
work, n = sys.argv[1], int(sys.argv[2])
lines = []
for i in range(n):
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + os.urandom(32)
    lines.append("ssh-ed25519 %s user%d@bench" % (base64.b64encode(blob).decode(), i))
open(os.path.join(work, "keys.pub"), "w").write("\n".join(lines) + "\n")
json.dump([{"id": i, "public_key": l} for i, l in enumerate(lines)], open(os.path.join(work, "list.json"), "w"))
PY
cat > "$work/config.toml" <<TOML
state_dir = "$work/state"
health_socket = "$work/health.sock"
[sources.local]
kind = "file"
path = "$work/list.json"
max_body = "64MiB"
[[users]]
name = "root"
sources = ["local"]
path = "$work/home/.ssh/authorized_keys"
TOML
python3 - "$bin" "$work" "$RUNS" <<'PY'
import os, statistics, subprocess, sys, time
bin, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
keysync = ["sh", "-c", f'rm -rf "{work}/state" "{work}/home"; exec "{bin}" run --once --config "{work}/config.toml"']
keygen = ["ssh-keygen", "-l", "-f", f"{work}/keys.pub"]
def run(cmd):
    t = time.perf_counter_ns()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter_ns() - t) / 1e6
for cmd in (keysync, keygen):  # warm-up: page cache, binary
    run(cmd)
a, b = [], []
for i in range(runs):
    order = (keysync, keygen) if i % 2 == 0 else (keygen, keysync)
    for cmd in order:
        (a if cmd is keysync else b).append(run(cmd))
ma, mb = statistics.median(a), statistics.median(b)
print(f"run --once, {len(a)} runs: median {ma:.1f} ms (min {min(a):.1f}, max {max(a):.1f})")
print(f"ssh-keygen -l -f, {len(b)} runs: median {mb:.1f} ms (min {min(b):.1f}, max {max(b):.1f})")
print(f"ratio of medians run --once / ssh-keygen -l: {ma / mb:.2f} (target <= 1.00)")
PY
