#!/usr/bin/env bash
# The benchmark suite of DESIGN.md §9, in one command:
#
#   bash bench/run.sh              # everything, ~30 min; rewrites the results in docs/benchmarks.md
#   bash bench/run.sh fleet idle   # only these parts; results to target/bench-results.md
#
# Parts (each compares with a baseline measured in the same run):
#   sync_pass    c. one sync pass at 10 … 100,000 keys: time, CPU, peak RSS (benches/sync_pass.rs)
#   propagation  a. control-plane change -> renamed file, subscribe and poll (benches/propagation.rs)
#   idle         d. idle RSS, CPU and wake-ups over 60 s; binary size (benches/idle.rs)
#   hook         the AuthorizedKeysCommand against cat (bench/hook.sh, when present)
#   login        f. key saved on the account -> working ssh login, with and without the
#                   login-triggered refresh; real sshd, needs root (benches/login.rs)
#   fanout       g. 100 agents behind the nginx fleet recipe against 100 straight at the
#                   origin: origin requests per change, propagation, nginx restart,
#                   polling through the cache; needs nginx and nchan (benches/fanout.rs)
#   fleet        b. 1,000 agents (as many as memory allows, ≥ 200) against one control plane,
#                   with a 30 s outage (benches/fleet.rs)
#
# Needs: cargo, and for some baselines curl and python3 (bench/hook.sh). Run
# it on an otherwise idle machine: the figures are only as quiet as the
# machine (the load average is recorded with the results). Run as root, the
# fleet's agents run as `nobody` so they do not use up root's inotify
# instances. Every agent a benchmark starts is stopped when it ends, also on
# failure or Ctrl-C (and swept up here, by recorded PID, as a last resort).
set -euo pipefail
cd "$(dirname "$0")/.."

all=(sync_pass propagation idle hook login fanout fleet)
if [ $# -gt 0 ]; then parts=("$@"); else parts=("${all[@]}"); fi
for p in "${parts[@]}"; do
    case " ${all[*]} " in *" $p "*) ;; *) echo "unknown part: $p (one of: ${all[*]})" >&2; exit 2 ;; esac
done

results=$(mktemp /tmp/keysync-bench-results.XXXXXX)
pids=$(mktemp /tmp/keysync-bench-pids.XXXXXX)
export KEYSYNC_BENCH_PIDS=$pids
sweep() {
    # Agents a benchmark recorded and that still run (it was killed before
    # its own cleanup): kill exactly those, and only if they are still keysync.
    while read -r pid; do
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q 'keysync run'; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done < "$pids"
    rm -f "$pids" "$results"
}
trap sweep EXIT
trap 'exit 130' INT TERM

# The fleet's fake control plane holds one connection per agent.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

machine() {
    local cpu mem
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
    mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
    echo "- command: \`bash bench/run.sh\`"
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- machine: $(nproc) CPUs (${cpu:-unknown}), ${mem} RAM, $(uname -sr)"
    echo "- virtualization: $(systemd-detect-virt 2>/dev/null || echo unknown)"
    echo "- toolchain: $(rustc --version)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
}

echo "== building the benchmarks (release profile)" >&2
benches=()
for p in "${parts[@]}"; do [ "$p" = hook ] || benches+=(--bench "$p"); done
# Built once, then run directly: `cargo bench` per part would rebuild
# whenever the sources change during the run, mixing versions in one report.
declare -A exe=()
if [ ${#benches[@]} -gt 0 ]; then
    built=$(cargo bench --quiet --no-run --message-format=json "${benches[@]}")
    while read -r path; do
        name=$(basename "$path")
        exe[${name%-*}]=$path
    done < <(grep -o '"executable":"[^"]*/deps/[^"]*"' <<< "$built" | sed 's/^"executable":"//; s/"$//')
fi

{
    machine
    echo
} >> "$results"

for p in "${parts[@]}"; do
    echo "== $p" >&2
    started=$(date +%s)
    if [ "$p" = hook ]; then
        if [ -f bench/hook.sh ]; then
            {
                echo "### e. AuthorizedKeysCommand hook (bench/hook.sh)"
                echo
                echo '```'
                bash bench/hook.sh
                echo '```'
                echo
            } >> "$results"
        else
            echo "(bench/hook.sh not present; skipped)" >&2
        fi
    else
        [ -n "${exe[$p]:-}" ] || { echo "no executable built for $p" >&2; exit 1; }
        "${exe[$p]}" --bench >> "$results"
    fi
    echo "== $p took $(( $(date +%s) - started )) s" >&2
    echo >> "$results"
done
echo "- load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$results"

if [ ${#parts[@]} -eq ${#all[@]} ] && [ -f docs/benchmarks.md ] && grep -q '<!-- BEGIN bench/run.sh results -->' docs/benchmarks.md; then
    out=docs/benchmarks.md
    awk -v f="$results" '
        /<!-- BEGIN bench\/run.sh results -->/ { print; while ((getline l < f) > 0) print l; skip = 1; next }
        /<!-- END bench\/run.sh results -->/ { skip = 0 }
        !skip { print }
    ' "$out" > "$out.tmp" && mv "$out.tmp" "$out"
else
    mkdir -p target
    out=target/bench-results.md
    cat "$results" > "$out"
fi
cat "$results"
echo "== results written to $out" >&2
