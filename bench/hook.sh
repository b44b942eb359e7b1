#!/usr/bin/env bash
# Benchmark of the sshd hook (DESIGN.md §9): whole-process wall time of
#   keysync authorized-keys --state-dir D USER            (sshd's %u)
#   keysync authorized-keys --state-dir D USER FPR        (the drop-in's %u %f)
# against
#   cat D/users/USER.keys
# on the same cache file, with 10 and with 10,000 keys. Target: the median
# of keysync within 1.2x the median of cat (goal 1.1x), with and without FPR.
#
#   bash bench/hook.sh                 # from the repo root; needs cargo, python3
#   ITER_SMALL=4000 ITER_BIG=1000 bash bench/hook.sh
#   BENCH_HOOK=dynamic-front bash bench/hook.sh  # the front linked dynamically
#   BENCH_HOOK=agent bash bench/hook.sh  # the agent binary alone as /usr/bin/keysync
#
# The hook is what the packages install: the front binary, statically
# linked by packaging/front.sh, as PREFIX/bin/keysync and the agent binary
# as PREFIX/libexec/keysync/keysync (src/cli/entry.rs), here under a scratch
# PREFIX. The front answers from the cache and its index itself, a refresh
# for an unknown key included, and execs the agent binary only when the
# index is stale or missing, so the "index removed" row times both.
#
# The caches (and their fingerprint index, users/USER.fpr) are written by
# the real agent (`keysync run --once` with a file source, write = "none"),
# so the hook reads exactly what it reads in production. The runner is a few
# lines of Python that posix_spawn()s each command and waits for it, timing
# spawn-to-reap with perf_counter_ns. Runs are interleaved (keysync, cat,
# cat, keysync, ...), so drift in machine load, CPU frequency or page cache
# hits both commands alike. Each command's stdout goes to /dev/null (the
# brief of §9) and, in a second table, to a pipe the runner drains, which is
# how sshd reads the hook.
#
# The FPR rows: a key in the middle of the cache (found through the index:
# a login with a cached key); a key that is not in the cache, with no agent
# running (the hook looks, cannot reach the socket, looks again: what a
# refused key costs while the agent is down); and, for reference, a cached
# key with the index removed (the hook parses the whole cache, as every FPR
# lookup did before the index existed).
set -euo pipefail
cd "$(dirname "$0")/.."

ITER_SMALL=${ITER_SMALL:-2000}
ITER_BIG=${ITER_BIG:-500}

command -v python3 >/dev/null || { echo "bench/hook.sh needs python3 (apt-get install python3)" >&2; exit 2; }

echo "== building the release binaries" >&2
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
built=$target_dir/release
cargo build --release --quiet --bins
case "${BENCH_HOOK:-installed}" in
    installed) bash packaging/front.sh --quiet ;;
    dynamic-front | agent) ;;
    *) echo "BENCH_HOOK is installed, dynamic-front or agent" >&2; exit 2 ;;
esac

work=$(mktemp -d /tmp/keysync-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/prefix/bin" "$work/prefix/libexec/keysync"
bin=$work/prefix/bin/keysync
case "${BENCH_HOOK:-installed}" in
    installed | dynamic-front)
        cp "$built/keysync-front" "$bin"
        cp "$built/keysync" "$work/prefix/libexec/keysync/keysync"
        ;;
    agent) cp "$built/keysync" "$bin" ;;
esac
# The ELF type (EXEC or DYN), and whether a program header names a loader.
kind=$(python3 - "$bin" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
e_type, = struct.unpack_from("<H", data, 16)
phoff, = struct.unpack_from("<Q", data, 32)
phentsize, phnum = struct.unpack_from("<HH", data, 54)
interp = any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))
print(("dynamic " if interp else "static ") + {2: "non-PIE", 3: "PIE"}.get(e_type, "?"))
EOF
)
echo "   $bin: ${BENCH_HOOK:-installed} ($kind, $(stat -c %s "$bin") bytes)" >&2
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
import base64, hashlib, os, shutil, statistics, subprocess, sys, time

bin_path, work, user, iter_small, iter_big = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cat = "/bin/cat"
env = {"PATH": "/usr/bin:/bin", "LANG": "C"}
devnull = os.open(os.devnull, os.O_RDWR)
TARGET, GOAL = 1.2, 1.1

def run(argv, sink):
    """Spawn argv, wait for it; ns from before spawn to after reap."""
    if sink == "null":
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)]
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        _, status = os.waitpid(pid, 0)
        t1 = time.perf_counter_ns()
    else:
        r, w = os.pipe()
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, devnull, 2), (os.POSIX_SPAWN_CLOSE, r)]
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

def fingerprint(line):
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

def variants(n):
    """The cache, and (label, hook argv, what it must print) for one size."""
    state = f"{work}/k{n}/state"
    cache = f"{state}/users/{user}.keys"
    with open(cache, "rb") as f:
        content = f.read()
    lines = content.decode().splitlines()
    middle = lines[len(lines) // 2]
    no_agent = f"{work}/no-agent.sock"
    base = [bin_path, "authorized-keys", "--state-dir", state, "--socket", no_agent, user]
    # The same cache in a state dir without the index: the fallback.
    bare = f"{work}/k{n}/bare"
    os.makedirs(f"{bare}/users", exist_ok=True)
    shutil.copy(cache, f"{bare}/users/{user}.keys")
    bare_argv = [bin_path, "authorized-keys", "--state-dir", bare, "--socket", no_agent, user]
    absent = "SHA256:" + base64.b64encode(hashlib.sha256(b"no such key").digest()).decode().rstrip("=")
    return cache, [
        ("all keys (%u)", base, content),
        ("FPR, a cached key (%u %f)", base + [fingerprint(middle)], (middle + "\n").encode()),
        ("FPR, an unknown key, no agent running", base + [absent], b""),
        ("FPR, a cached key, index removed (the path before the index)", bare_argv + [fingerprint(middle)], (middle + "\n").encode()),
    ]

def bench(hook, plain, iterations, sink):
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
    return f"    {label:<8} median {us(statistics.median(t))} us   p10 {us(q[0])}   p90 {us(q[-1])}"

for sink in ("null", "pipe"):
    print(f"stdout to {'/dev/null' if sink == 'null' else 'a pipe (as sshd reads it)'}:")
    for n, iterations in ((10, iter_small), (10000, iter_big)):
        cache, cases = variants(n)
        size = os.path.getsize(cache)
        print(f" {n:>6} keys ({size} bytes), {iterations} interleaved runs each, against cat of the cache")
        for label, hook, expected in cases:
            # The hook must print exactly this, or the comparison means nothing.
            out = subprocess.run(hook, capture_output=True, check=True).stdout
            assert out == expected, f"{label}: the hook printed {len(out)} bytes, expected {len(expected)}"
            t_hook, t_cat = bench(hook, [cat, cache], iterations, sink)
            ratio = statistics.median(t_hook) / statistics.median(t_cat)
            verdict = "goal met" if ratio <= GOAL else "ok" if ratio <= TARGET else f"MISSES the {TARGET}x target"
            print(f"  {label}")
            print(row("keysync", t_hook))
            print(row("cat", t_cat))
            print(f"    ratio keysync/cat (medians) {ratio:.2f}  {verdict}")
    print()
EOF
