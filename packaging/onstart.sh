#!/bin/sh
# keysync without systemd (a container's onstart field, up to 4,048 chars):
# installs the binary, writes the config, wires sshd, supervises `keysync
# run`. Safe to run again. Env: VAST_API_KEY (stored 0600, not kept in env),
# KEYSYNC_BIN (https:// URL or path; KEYSYNC_SHA256 checks it), KEYSYNC_URL,
# KEYSYNC_USER (root), KEYSYNC_AUTHORIZED_KEYS; paths: KEYSYNC_INSTALL,
# _ETC, _STATE, _RUN, _LOG. See packaging.md.
set -eu
B=${KEYSYNC_INSTALL:-/usr/local/bin/keysync}
E=${KEYSYNC_ETC:-/etc/keysync}
S=${KEYSYNC_STATE:-/var/lib/keysync}
R=${KEYSYNC_RUN:-/run/keysync}
L=${KEYSYNC_LOG:-/var/log/keysync.log}
U=${KEYSYNC_USER:-root}
C=$E/config.toml
say() { echo "keysync-onstart: $*" >&2; }
umask 022
mkdir -p "$(dirname "$B")" "$E" "$S" "$R" "$(dirname "$L")"
chmod 0750 "$E" "$S" "$R"

# 1. The binary: download or copy to a temp name, test it, rename.
src=${KEYSYNC_BIN:-}
if [ -n "$src" ]; then
  t=$B.new.$$
  case $src in
    https://* | http://*)
      if command -v curl >/dev/null; then
        curl -fsSL --retry 3 -o "$t" "$src"
      else
        wget -qO "$t" "$src"
      fi ;;
    *) cp "$src" "$t" ;;
  esac
  if [ -n "${KEYSYNC_SHA256:-}" ]; then
    echo "$KEYSYNC_SHA256  $t" | sha256sum -c - >/dev/null || { rm -f "$t"; say "checksum mismatch"; exit 1; }
  fi
  chmod 0755 "$t"
  "$t" --version >/dev/null || { rm -f "$t"; say "$src does not run here"; exit 1; }
  mv -f "$t" "$B"
fi
[ -x "$B" ] || { say "no binary at $B: set KEYSYNC_BIN"; exit 1; }

# 2. The API key in a root-only file, not in the config nor the agent's env.
if [ -n "${VAST_API_KEY:-}" ]; then
  (umask 077 && printf '%s\n' "$VAST_API_KEY" > "$E/api-key.new" && mv -f "$E/api-key.new" "$E/api-key")
fi
unset VAST_API_KEY
[ -s "$E/api-key" ] || say "no API key yet: write $E/api-key (0600), no restart needed"

# 3. The config (rewritten each start, so env changes apply).
{
  echo "state_dir = \"$S\""
  echo "health_socket = \"$R/health.sock\""
  echo '[sources.account]'
  echo 'kind = "vast"'
  echo "url = \"${KEYSYNC_URL:-https://console.vast.ai/api/v0/ssh/}\""
  echo "api_key_file = \"$E/api-key\""
  echo "interval = \"${KEYSYNC_INTERVAL:-60s}\""
  echo '[[users]]'
  echo "name = \"$U\""
  echo 'sources = ["account"]'
  [ -z "${KEYSYNC_AUTHORIZED_KEYS:-}" ] || echo "path = \"$KEYSYNC_AUTHORIZED_KEYS\""
} > "$C.new"
"$B" check-config --config "$C.new" >/dev/null || { say "bad config in $C.new"; exit 2; }
mv -f "$C.new" "$C"

# 4. sshd (default state dir): RevokedKeys refuses deleted keys also where
# copied. The file first: sshd refuses all keys without it. Yours win.
D=/etc/ssh/sshd_config.d
F=$D/50-keysync.conf
K=/var/lib/keysync/revoked_keys
if [ "$S/revoked_keys" = $K ] && : >> $K && chmod 644 $K && [ -d $D ] && [ ! -e $F ]; then
  g() { grep -qsi "^[[:space:]]*$1[[:space:]=]" /etc/ssh/sshd_config $D/*.conf; }
  {
    g RevokedKeys || echo "RevokedKeys $K"
    ! id keysync >/dev/null 2>&1 || g AuthorizedKeysCommand ||
      printf 'AuthorizedKeysCommand %s authorized-keys %%u %%f\nAuthorizedKeysCommandUser keysync\n' "$B"
  } > $F.n
  if [ -s $F.n ] && mv $F.n $F && sshd -t; then
    kill -HUP "$(cat /run/sshd.pid 2>/dev/null)" 2>/dev/null || :
  else rm -f $F.n $F; fi
fi

# 5. Supervise: restart keysync when it exits; TERM to the supervisor
# ($R/supervisor.pid) stops both. A running agent reloads the config
# itself, so a second run only checks it is alive.
P=$R/supervisor.pid
if [ -s "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; then
  say "already running (pid $(cat "$P"))"
  exit 0
fi
# shellcheck disable=SC2016 # expanded by the inner sh
nohup sh -c '
  echo $$ > "$3"
  trap "kill \$c 2>/dev/null; wait \$c; exit 0" TERM INT
  while :; do
    "$1" run --config "$2" & c=$!
    echo $c > "$3.agent"
    wait $c && r=0 || r=$?
    echo "keysync-onstart: keysync exited ($r), restarting in 5s" >&2
    sleep 5 & wait $!
  done' keysync-supervisor "$B" "$C" "$P" >> "$L" 2>&1 < /dev/null &
say "started, log in $L; ready when: $B status --socket $R/health.sock --check"
