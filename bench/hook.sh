#!/usr/bin/env bash
# Benchmark of the sshd hook (DESIGN.md §9): whole-process wall time of
#   keysync authorized-keys --state-dir D USER
# against
#   cat D/users/USER.keys
# on the same cache file, with 10 and with 10,000 keys. Target: the median
# of keysync within 1.5x the median of cat at both sizes.
#
#   bash bench/hook.sh                 # from the repo root; needs cargo, python3
#   ITER_SMALL=4000 ITER_BIG=1000 bash bench/hook.sh
#   BENCH_NO_PIE=1 bash bench/hook.sh  # the same code linked as a non-PIE executable
#
# The caches are written by the real agent (`keysync run --once` with a file
# source, write = "none"), so the hook reads exactly what it reads in
# production. The runner is a few lines of Python that posix_spawn()s each
# command and waits for it, timing spawn-to-reap with perf_counter_ns.
# Runs are interleaved (keysync, cat, cat, keysync, ...), so drift in machine
# load, CPU frequency or page cache hits both commands alike. Each command's
# stdout goes to /dev/null (the brief of §9) and, in a second table, to a
# pipe the runner drains, which is how sshd reads the hook.
set -euo pipefail
cd "$(dirname "$0")/.."

ITER_SMALL=${ITER_SMALL:-2000}
ITER_BIG=${ITER_BIG:-500}

command -v python3 >/dev/null || { echo "bench/hook.sh needs python3 (apt-get install python3)" >&2; exit 2; }

echo "== building the release binary" >&2
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
if [ "${BENCH_NO_PIE:-0}" = 1 ]; then
    # Most of what keysync costs beyond cat is the dynamic loader applying
    # ~14,000 relative relocations to a position-independent executable:
    # ~60 copy-on-write page faults. A non-PIE build has none. --target keeps
    # the flag off build scripts and proc macros, which must stay PIC.
    host=$(rustc -vV | sed -n 's/^host: //p')
    RUSTFLAGS="-C relocation-model=static" cargo build --release --quiet --target "$host"
    bin=$target_dir/$host/release/keysync
else
    cargo build --release --quiet
    bin=$target_dir/release/keysync
fi
kind=$(python3 -c 'import sys; f = open(sys.argv[1], "rb"); f.seek(16); print({2: "non-PIE", 3: "PIE"}.get(int.from_bytes(f.read(2), "little"), "?"))' "$bin")
echo "   $bin ($kind)" >&2

work=$(mktemp -d /tmp/keysync-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
user=$(id -un)

echo "== writing caches with the agent" >&2
for n in 10 10000; do
    dir=$work/k$n
    mkdir -p "$dir"
    # n distinct ed25519 public keys (random 32-byte points: OpenSSH and the
    # agent accept any 32 bytes; nothing here needs real private keys).
    python3 - "$n" > "$dir/keys.pub" <<'EOF'
import base64, os, struct, sys
for i in range(int(sys.argv[1])):
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + os.urandom(32)
    print(f"ssh-ed25519 {base64.b64encode(blob).decode()} bench-{i}@keysync")
EOF
    cat > "$dir/config.toml" <<EOF
state_dir = "$dir/state"
health_socket = "$dir/health.sock"

[sources.bench]
kind = "file"
path = "$dir/keys.pub"

[[users]]
name = "$user"
sources = ["bench"]
write = "none"
EOF
    KEYSYNC_LOG=warn "$bin" run --once --config "$dir/config.toml"
    lines=$(wc -l < "$dir/state/users/$user.keys")
    [ "$lines" -eq "$n" ] || { echo "cache has $lines keys, expected $n" >&2; exit 1; }
done

echo "== measuring ($(nproc) CPUs, $(uname -r))" >&2
python3 - "$bin" "$work" "$user" "$ITER_SMALL" "$ITER_BIG" <<'EOF'
import os, statistics, subprocess, sys, time

bin_path, work, user, iter_small, iter_big = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cat = "/bin/cat"
env = {"PATH": "/usr/bin:/bin", "LANG": "C"}
devnull = os.open(os.devnull, os.O_RDWR)

def run(argv, sink):
    """Spawn argv, wait for it; ns from before spawn to after reap."""
    if sink == "null":
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1)]
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        _, status = os.waitpid(pid, 0)
        t1 = time.perf_counter_ns()
    else:
        r, w = os.pipe()
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_CLOSE, r)]
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        os.close(w)
        while os.read(r, 1 << 20):
            pass
        _, status = os.waitpid(pid, 0)
        t1 = time.perf_counter_ns()
        os.close(r)
    if status != 0:
        sys.exit(f"{argv} failed with wait status {status}")
    return t1 - t0

def bench(n, iterations, sink):
    state = f"{work}/k{n}/state"
    cache = f"{state}/users/{user}.keys"
    hook = [bin_path, "authorized-keys", "--state-dir", state, user]
    plain = [cat, cache]
    # The hook must print exactly the cache, or the comparison means nothing.
    out = subprocess.run(hook, capture_output=True, check=True).stdout
    with open(cache, "rb") as f:
        assert out == f.read(), "keysync authorized-keys does not print the cache"
    for _ in range(max(20, iterations // 20)):  # warm up: page cache, binaries
        run(hook, sink); run(plain, sink)
    t_hook, t_cat = [], []
    for i in range(iterations):
        # ABBA order: neither command always goes first.
        if i % 2 == 0:
            t_hook.append(run(hook, sink)); t_cat.append(run(plain, sink))
        else:
            t_cat.append(run(plain, sink)); t_hook.append(run(hook, sink))
    return t_hook, t_cat

def us(ns):
    return f"{ns / 1000:8.1f}"

def row(label, t):
    q = statistics.quantiles(t, n=10)
    return f"  {label:<8} median {us(statistics.median(t))} us   p10 {us(q[0])}   p90 {us(q[-1])}"

for sink in ("null", "pipe"):
    print(f"stdout to {'/dev/null' if sink == 'null' else 'a pipe (as sshd reads it)'}:")
    for n, iterations in ((10, iter_small), (10000, iter_big)):
        size = os.path.getsize(f"{work}/k{n}/state/users/{user}.keys")
        t_hook, t_cat = bench(n, iterations, sink)
        ratio = statistics.median(t_hook) / statistics.median(t_cat)
        verdict = "ok" if ratio <= 1.5 else "MISSES the 1.5x target"
        print(f" {n:>6} keys ({size} bytes), {iterations} interleaved runs each")
        print(row("keysync", t_hook))
        print(row("cat", t_cat))
        print(f"  ratio keysync/cat (medians) {ratio:.2f}  {verdict}")
    print()
EOF
