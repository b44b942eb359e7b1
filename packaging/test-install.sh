#!/usr/bin/env bash
# Installs, upgrades, removes and purges the packages in a throwaway Debian 12
# root (made by mmdebstrap with systemd and openssh-server, see
# packaging/README.md), and asserts what each maintainer script promises.
#
#   packaging/test-install.sh ROOT DEB1 DEB2 RPM1 RPM2
#
# DEB2/RPM2 are the same binary with revision 2: a real upgrade for dpkg/rpm.
# Runs as root; mounts /proc in ROOT (unmounted on exit). Nothing outside
# ROOT is touched: no sshd or systemd of the host is reloaded (ROOT has no
# /run/systemd/system and no sshd pid file, so the scripts start nothing).
set -euo pipefail

root=$1 deb1=$2 deb2=$3 rpm1=$4 rpm2=$5

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
# Runs a command inside ROOT with a clean environment.
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }
# expect DESCRIPTION COMMAND...: the command must succeed.
expect() { local what=$1; shift; "$@" || fail "$what"; }
# Inside ROOT, so owner names come from ROOT's passwd and group files.
mode_of() { in_root stat -c '%a %U %G' "$1"; }
link_of() { readlink "$root$1" 2>/dev/null || true; }
# deb-systemd-helper names /lib/systemd/system (the same directory on a
# merged-/usr system like Debian 12), systemctl /usr/lib/systemd/system.
unit_enabled() {
    case "$(link_of "$wants")" in
        /lib/systemd/system/keysync.service | /usr/lib/systemd/system/keysync.service) return 0 ;;
        *) return 1 ;;
    esac
}
absent() { [ ! -e "$root$1" ] && [ ! -L "$root$1" ]; }
# dpkg-query's ${Field} formats are not shell expansions.
# shellcheck disable=SC2016
pkg_status() { in_root dpkg-query -W -f '${Status} ${Version}' keysync 2>/dev/null || true; }
sshd_akc() { in_root /usr/sbin/sshd -T 2>/dev/null | awk '$1 == "authorizedkeyscommand" { $1 = ""; sub(/^ /, ""); print }'; }
sshd_rk() { in_root /usr/sbin/sshd -T 2>/dev/null | awk '$1 == "revokedkeys" { print $2 }'; }

dropin=/etc/ssh/sshd_config.d/50-keysync.conf
ours=/usr/share/keysync/sshd_config.d/50-keysync.conf
ours_command=/usr/share/keysync/sshd_config.d/command-only.conf
ours_revoked=/usr/share/keysync/sshd_config.d/revoked-keys-only.conf
revoked=/var/lib/keysync/revoked_keys

# After every step: sshd accepts its config, and every RevokedKeys it names
# (in effect per sshd -T, or on any line of a regular file under /etc/ssh)
# is an existing regular file. sshd -t alone does not check that, and sshd
# refuses every public key while its RevokedKeys file is missing.
sshd_ok() {
    local what=$1 rk
    [ -x "$root/usr/sbin/sshd" ] || return 0
    in_root /usr/sbin/sshd -t || fail "$what: sshd -t rejects the config"
    while read -r rk; do
        [ -z "$rk" ] || [ "$rk" = none ] || [ -f "$root$rk" ] \
            || fail "$what: sshd's config names RevokedKeys $rk, which does not exist"
    done < <(sshd_rk; find "$root/etc/ssh" -type f -exec grep -hsiE '^[[:space:]]*RevokedKeys([[:space:]]|=)' {} + | awk '{ print $2 }')
    echo "sshd config ok after: $what"
}
wants=/etc/systemd/system/multi-user.target.wants/keysync.service

mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
mkdir -p "$root/tmp/pkgs" "$root/run/sshd"
cp "$deb1" "$root/tmp/pkgs/keysync-1.deb"
cp "$deb2" "$root/tmp/pkgs/keysync-2.deb"
cp "$rpm1" "$root/tmp/pkgs/keysync-1.rpm"
cp "$rpm2" "$root/tmp/pkgs/keysync-2.rpm"

# A user's key file with keysync's managed block in it: removal and purge
# must leave it byte for byte.
mkdir -p "$root/root/.ssh"
cat > "$root/root/.ssh/authorized_keys" <<'EOF'
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFRzugNBd+MDtj+CrHEVbfNBi8jOKFGD1yT48UoTK0oN added-by-hand
# BEGIN keysync managed keys: edits inside this block are overwritten
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi alice@laptop
# END keysync managed keys
EOF
chmod 0600 "$root/root/.ssh/authorized_keys"
keys_sum=$(sha256sum < "$root/root/.ssh/authorized_keys")

# ---------------------------------------------------------------------------
step "deb: first install (systemd and openssh-server present, no other AuthorizedKeysCommand)"
in_root dpkg -i /tmp/pkgs/keysync-1.deb 2>&1 | tee "$root/tmp/install.log"
expect "keysync 0.1.0-1 installed" [ "$(pkg_status)" = "install ok installed $(dpkg-deb -f "$deb1" Version)" ]
expect "user keysync: home /, nologin" [ "$(in_root getent passwd keysync | cut -d: -f6,7)" = "/:/usr/sbin/nologin" ]
expect "group keysync" in_root getent group keysync
expect "/etc/keysync 0750 root:root" [ "$(mode_of /etc/keysync)" = "750 root root" ]
expect "/var/lib/keysync 0750 root:keysync" [ "$(mode_of /var/lib/keysync)" = "750 root keysync" ]
expect "/var/lib/keysync/users 2750 root:keysync" [ "$(mode_of /var/lib/keysync/users)" = "2750 root keysync" ]
expect "/run/keysync 2750 root:keysync" [ "$(mode_of /run/keysync)" = "2750 root keysync" ]
expect "unit enabled" unit_enabled
expect "drop-in linked" [ "$(link_of $dropin)" = "$ours" ]
expect "sshd uses keysync's AuthorizedKeysCommand" [ "$(sshd_akc)" = "/usr/bin/keysync authorized-keys %u %f" ]
expect "sshd uses keysync's RevokedKeys" [ "$(sshd_rk)" = "$revoked" ]
expect "$revoked empty, 0644 root:root" [ "$(mode_of $revoked) $(stat -c %s "$root$revoked")" = "644 root root 0" ]
sshd_ok "deb install"
expect "sshd runs it as keysync" in_root sh -c '/usr/sbin/sshd -T | grep -qx "authorizedkeyscommanduser keysync"'
expect "binary runs" in_root keysync --version
# The default config is valid; the missing API key is a warning, not an error.
in_root keysync check-config > "$root/tmp/check-config.out" || fail "check-config rejects the default config"
expect "check-config names the missing key" grep -q "WARNING: no API key: api_key_file is missing" "$root/tmp/check-config.out"
# The hook, as sshd runs it (user keysync), reads a cache the daemon would write.
printf '%s\n' "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN7rZ17cV9ag1ih2ph/mjt/dQyeQsJHFDMID9ZaAPkRi alice@laptop" > "$root/var/lib/keysync/users/root.keys"
chmod 0640 "$root/var/lib/keysync/users/root.keys"
chgrp --reference="$root/var/lib/keysync/users" "$root/var/lib/keysync/users/root.keys"
expect "hook prints the cache as user keysync" [ "$(chroot --userspec=keysync:keysync "$root" /usr/bin/keysync authorized-keys root)" = "$(cat "$root/var/lib/keysync/users/root.keys")" ]
# As sshd runs it with %u %f: the offered key's fingerprint; with no agent
# running, a key not in the cache gets the cache as it is, at once.
fpr=$(in_root ssh-keygen -lf /var/lib/keysync/users/root.keys | awk '{ print $2 }')
expect "hook with %f prints the matching key" [ "$(chroot --userspec=keysync:keysync "$root" /usr/bin/keysync authorized-keys root "$fpr")" = "$(cat "$root/var/lib/keysync/users/root.keys")" ]
expect "hook with another %f, no agent: exits 0" chroot --userspec=keysync:keysync "$root" /usr/bin/keysync authorized-keys root SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA
for f in /usr/share/man/man1/keysync.1.gz /usr/share/bash-completion/completions/keysync \
         /usr/share/zsh/vendor-completions/_keysync /usr/share/fish/vendor_completions.d/keysync.fish \
         /usr/lib/sysusers.d/keysync.conf /usr/lib/tmpfiles.d/keysync.conf /usr/share/doc/keysync/copyright; do
    expect "$f installed" [ -s "$root$f" ]
done

step "deb: upgrade to revision 2 keeps the edited conffile, the API key and the hook"
echo '# local edit' >> "$root/etc/keysync/config.toml"
(umask 077 && echo test-api-key > "$root/etc/keysync/api-key")
in_root dpkg -i /tmp/pkgs/keysync-2.deb
expect "revision 2 installed" [ "$(pkg_status)" = "install ok installed $(dpkg-deb -f "$deb2" Version)" ]
expect "conffile edit kept" grep -qx '# local edit' "$root/etc/keysync/config.toml"
expect "no .dpkg-dist" [ ! -e "$root/etc/keysync/config.toml.dpkg-dist" ]
expect "API key kept" [ "$(cat "$root/etc/keysync/api-key")" = test-api-key ]
expect "still enabled" [ -L "$root$wants" ]
expect "drop-in still linked" [ "$(link_of $dropin)" = "$ours" ]
sshd_ok "deb upgrade"

step "deb: the same package installed again; the revoked list is never truncated"
echo "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFRzugNBd+MDtj+CrHEVbfNBi8jOKFGD1yT48UoTK0oN revoked" > "$root$revoked"
in_root dpkg -i /tmp/pkgs/keysync-2.deb
expect "drop-in still linked" [ "$(link_of $dropin)" = "$ours" ]
expect "revoked list kept" grep -q ' revoked$' "$root$revoked"
sshd_ok "deb reinstall"

step "deb: an upgrade's unpack never leaves the drop-in naming a missing file"
# As after an upgrade from a package without RevokedKeys, or a state dir
# emptied by hand: the link is there, the file is not. The preinst runs
# before the unpack, so the file is back before dpkg touches the drop-in.
rm "$root$revoked"
in_root dpkg --unpack /tmp/pkgs/keysync-2.deb
expect "preinst created $revoked before the unpack" [ -f "$root$revoked" ]
expect "still empty, 0644 root:root" [ "$(mode_of $revoked) $(stat -c %s "$root$revoked")" = "644 root root 0" ]
sshd_ok "deb unpack (not configured yet)"
in_root dpkg --configure keysync
sshd_ok "deb configure"

step "deb: an admin's removal of the drop-in survives reinstalls"
rm "$root$dropin"
in_root dpkg -i /tmp/pkgs/keysync-2.deb 2>&1 | tee "$root/tmp/install.log"
expect "drop-in left off" [ ! -e "$root$dropin" ]
expect "says why" grep -q "removed by hand" "$root/tmp/install.log"
sshd_ok "reinstall without the drop-in"
in_root /usr/libexec/keysync/sshd-hook enable
expect "sshd-hook enable puts it back" [ "$(link_of $dropin)" = "$ours" ]
sshd_ok "sshd-hook enable"

step "deb: remove keeps config and state, takes the hook away, leaves key files"
in_root dpkg -r keysync
expect "binary gone" [ ! -e "$root/usr/bin/keysync" ]
expect "drop-in gone" absent "$dropin"
expect "sshd back to no command" [ "$(sshd_akc)" = none ]
expect "sshd back to no RevokedKeys" [ "$(sshd_rk)" = none ]
expect "revoked file kept until purge" [ -f "$root$revoked" ]
sshd_ok "deb remove"
expect "config kept" grep -qx '# local edit' "$root/etc/keysync/config.toml"
expect "state kept" [ -d "$root/var/lib/keysync/users" ]
expect "key file untouched" [ "$(sha256sum < "$root/root/.ssh/authorized_keys")" = "$keys_sum" ]

step "deb: purge removes keysync's state and config, not the users' keys"
in_root dpkg -P keysync
for d in /var/lib/keysync /run/keysync /etc/keysync; do
    expect "$d gone" [ ! -e "$root$d" ]
done
expect "no unit links left" [ -z "$(find "$root/etc/systemd/system" -name 'keysync*')" ]
expect "key file untouched" [ "$(sha256sum < "$root/root/.ssh/authorized_keys")" = "$keys_sum" ]
expect "dpkg forgot it" [ -z "$(pkg_status)" ]
sshd_ok "deb purge"

# ---------------------------------------------------------------------------
step "deb: another AuthorizedKeysCommand in sshd_config is never overridden; RevokedKeys alone is linked"
cp "$root/etc/ssh/sshd_config" "$root/etc/ssh/sshd_config.orig"
printf 'AuthorizedKeysCommand /usr/local/bin/other-keys %%u\nAuthorizedKeysCommandUser nobody\n' >> "$root/etc/ssh/sshd_config"
in_root dpkg -i /tmp/pkgs/keysync-1.deb 2>&1 | tee "$root/tmp/install.log"
expect "the RevokedKeys-only drop-in is linked" [ "$(link_of $dropin)" = "$ours_revoked" ]
expect "says why" grep -q "AuthorizedKeysCommand is already set in: /etc/ssh/sshd_config" "$root/tmp/install.log"
expect "the other command stays in effect" [ "$(sshd_akc)" = "/usr/local/bin/other-keys %u" ]
expect "its user too" in_root sh -c '/usr/sbin/sshd -T | grep -qx "authorizedkeyscommanduser nobody"'
expect "keysync's RevokedKeys in effect" [ "$(sshd_rk)" = "$revoked" ]
sshd_ok "deb install beside another AuthorizedKeysCommand"

step "deb: once the other command is gone, the upgrade places the drop-in"
cp "$root/etc/ssh/sshd_config.orig" "$root/etc/ssh/sshd_config"
in_root dpkg -i /tmp/pkgs/keysync-2.deb
expect "full drop-in placed" [ "$(link_of $dropin)" = "$ours" ]
sshd_ok "deb upgrade after the other command went"

step "deb: a command appearing later (earlier drop-in) makes keysync step back to RevokedKeys alone"
printf 'AuthorizedKeysCommand /usr/local/bin/other-keys %%u\nAuthorizedKeysCommandUser nobody\n' > "$root/etc/ssh/sshd_config.d/10-other.conf"
in_root dpkg -i /tmp/pkgs/keysync-2.deb 2>&1 | tee "$root/tmp/install.log"
expect "link switched to RevokedKeys only" [ "$(link_of $dropin)" = "$ours_revoked" ]
expect "says why" grep -q "AuthorizedKeysCommand is already set in: /etc/ssh/sshd_config.d/10-other.conf" "$root/tmp/install.log"
sshd_ok "deb upgrade with a later command"
rm "$root/etc/ssh/sshd_config.d/10-other.conf"
in_root dpkg -P keysync
sshd_ok "deb purge"

# ---------------------------------------------------------------------------
step "deb: an admin's RevokedKeys in sshd_config is kept; the command is linked alone"
touch "$root/etc/ssh/other_revoked"
echo 'RevokedKeys /etc/ssh/other_revoked' >> "$root/etc/ssh/sshd_config"
in_root dpkg -i /tmp/pkgs/keysync-1.deb 2>&1 | tee "$root/tmp/install.log"
expect "the command-only drop-in is linked" [ "$(link_of $dropin)" = "$ours_command" ]
expect "the admin's RevokedKeys stays in effect" [ "$(sshd_rk)" = /etc/ssh/other_revoked ]
expect "keysync's command in effect" [ "$(sshd_akc)" = "/usr/bin/keysync authorized-keys %u %f" ]
expect "says it is kept" grep -q "RevokedKeys is already configured (set in: /etc/ssh/sshd_config)" "$root/tmp/install.log"
expect "says what to add by hand" grep -q "ssh-keygen -k -u -f YOURFILE $revoked" "$root/tmp/install.log"
expect "$revoked exists all the same" [ -f "$root$revoked" ]
sshd_ok "deb install beside another RevokedKeys"
in_root dpkg -i /tmp/pkgs/keysync-2.deb
expect "upgrade: still command-only" [ "$(link_of $dropin)" = "$ours_command" ]
sshd_ok "deb upgrade beside another RevokedKeys"

step "deb: both set by the admin: nothing is linked, and the admin is told"
printf 'AuthorizedKeysCommand /usr/local/bin/other-keys %%u\nAuthorizedKeysCommandUser nobody\n' >> "$root/etc/ssh/sshd_config"
in_root dpkg -i /tmp/pkgs/keysync-2.deb 2>&1 | tee "$root/tmp/install.log"
expect "drop-in removed" absent "$dropin"
expect "says why (command)" grep -q "AuthorizedKeysCommand is already set in: /etc/ssh/sshd_config" "$root/tmp/install.log"
expect "says why (RevokedKeys)" grep -q "RevokedKeys is already configured" "$root/tmp/install.log"
expect "both of the admin's settings in effect" [ "$(sshd_akc) $(sshd_rk)" = "/usr/local/bin/other-keys %u /etc/ssh/other_revoked" ]
sshd_ok "deb upgrade beside both settings"
in_root dpkg -r keysync
expect "remove: the admin's settings stay" [ "$(sshd_akc) $(sshd_rk)" = "/usr/local/bin/other-keys %u /etc/ssh/other_revoked" ]
sshd_ok "deb remove beside both settings"
in_root dpkg -P keysync
expect "purge: the admin's RevokedKeys file stays" [ -e "$root/etc/ssh/other_revoked" ]
sshd_ok "deb purge beside both settings"

step "deb: purge keeps $revoked while an admin's RevokedKeys names it"
cp "$root/etc/ssh/sshd_config.orig" "$root/etc/ssh/sshd_config"
in_root dpkg -i /tmp/pkgs/keysync-1.deb
# What the hook's advice says: point RevokedKeys at keysync's file.
echo "RevokedKeys $revoked" >> "$root/etc/ssh/sshd_config"
in_root dpkg -i /tmp/pkgs/keysync-2.deb 2>&1 | tee "$root/tmp/install.log"
expect "command-only: RevokedKeys is the admin's line" [ "$(link_of $dropin)" = "$ours_command" ]
expect "says nothing is to add" grep -q "already configured with keysync's $revoked" "$root/tmp/install.log"
sshd_ok "deb upgrade with RevokedKeys pointed at keysync's file"
in_root dpkg -P keysync 2>&1 | tee "$root/tmp/purge.log"
expect "revoked file kept" [ -f "$root$revoked" ]
expect "the rest of the state is gone" [ "$(ls -A "$root/var/lib/keysync")" = revoked_keys ]
expect "says why" grep -q "kept $revoked: sshd's config still names it" "$root/tmp/purge.log"
sshd_ok "deb purge while the admin names keysync's file"
cp "$root/etc/ssh/sshd_config.orig" "$root/etc/ssh/sshd_config"
rm -rf "$root/var/lib/keysync" "$root/etc/ssh/other_revoked"

step "deb: another state_dir in the config: RevokedKeys is not linked"
mkdir -p "$root/etc/keysync/config.d"
printf 'state_dir = "/srv/keysync"\n' > "$root/etc/keysync/config.d/10-state.toml"
in_root dpkg -i /tmp/pkgs/keysync-1.deb 2>&1 | tee "$root/tmp/install.log"
expect "command-only" [ "$(link_of $dropin)" = "$ours_command" ]
expect "says why" grep -q "the agent's state_dir is /srv/keysync, not /var/lib/keysync" "$root/tmp/install.log"
sshd_ok "deb install with another state_dir"
rm -rf "$root/etc/keysync/config.d"
in_root dpkg -i /tmp/pkgs/keysync-2.deb
expect "back to the default: full drop-in" [ "$(link_of $dropin)" = "$ours" ]
sshd_ok "deb upgrade back to the default state_dir"
in_root dpkg -P keysync
rm "$root/etc/ssh/sshd_config.orig"
sshd_ok "deb purge"

# ---------------------------------------------------------------------------
step "deb: a container-like root without systemd-sysusers, systemd-tmpfiles and sshd"
in_root userdel keysync
in_root getent group keysync >/dev/null && in_root groupdel keysync
hidden="/usr/bin/systemd-sysusers /usr/bin/systemd-tmpfiles /usr/sbin/sshd"
for f in $hidden; do in_root dpkg-divert --quiet --local --rename --divert "$f.hidden" --add "$f"; done
in_root dpkg -i /tmp/pkgs/keysync-1.deb 2>&1 | tee "$root/tmp/install.log"
expect "user created by useradd" [ "$(in_root getent passwd keysync | cut -d: -f6,7)" = "/:/usr/sbin/nologin" ]
expect "system uid" [ "$(in_root id -u keysync)" -lt 1000 ]
expect "/var/lib/keysync/users 2750 root:keysync" [ "$(mode_of /var/lib/keysync/users)" = "2750 root keysync" ]
expect "/run/keysync 2750 root:keysync" [ "$(mode_of /run/keysync)" = "2750 root keysync" ]
expect "/etc/keysync 0750 root:root" [ "$(mode_of /etc/keysync)" = "750 root root" ]
expect "no drop-in without sshd" [ ! -e "$root$dropin" ]
expect "$revoked made by hand: empty, 0644 root:root" [ "$(mode_of $revoked) $(stat -c %s "$root$revoked")" = "644 root root 0" ]
expect "says why" grep -q "no sshd" "$root/tmp/install.log"
in_root dpkg -P keysync
for f in $hidden; do in_root dpkg-divert --quiet --local --rename --remove "$f"; done
expect "diversions undone" [ -x "$root/usr/sbin/sshd" ]

# ---------------------------------------------------------------------------
# The .rpm's scriptlets, run by the host's rpm inside the same root (rpm
# chroots into --root for scriptlets): RPM's argument conventions on a
# systemd + openssh userland. --nodeps: the root's libraries are dpkg's.
step "rpm: install, upgrade, erase (scriptlets in the Debian root)"
rpm_in() { rpm --root "$root" --dbpath /var/lib/rpm --nodeps "$@"; }
rpm --root "$root" --dbpath /var/lib/rpm --initdb
rpm_in -i "$root/tmp/pkgs/keysync-1.rpm"
expect "rpm: binary" [ -x "$root/usr/bin/keysync" ]
expect "rpm: user keysync" in_root getent passwd keysync
expect "rpm: /var/lib/keysync/users 2750 root:keysync" [ "$(mode_of /var/lib/keysync/users)" = "2750 root keysync" ]
expect "rpm: unit enabled" unit_enabled
expect "rpm: drop-in linked" [ "$(link_of $dropin)" = "$ours" ]
expect "rpm: $revoked empty, 0644 root:root" [ "$(mode_of $revoked) $(stat -c %s "$root$revoked")" = "644 root root 0" ]
sshd_ok "rpm install"
rm "$root$revoked"
echo '# local edit' >> "$root/etc/keysync/config.toml"
rpm_in -U "$root/tmp/pkgs/keysync-2.rpm"
expect "rpm: release 2" [ "$(rpm --root "$root" --dbpath /var/lib/rpm -q --qf '%{RELEASE}' keysync)" = 2 ]
expect "rpm: config edit kept" grep -qx '# local edit' "$root/etc/keysync/config.toml"
expect "rpm: still enabled" [ -L "$root$wants" ]
expect "rpm: drop-in still linked" [ "$(link_of $dropin)" = "$ours" ]
expect "rpm: %pre/%post put the revoked file back" [ -f "$root$revoked" ]
sshd_ok "rpm upgrade"
rpm_in -e keysync
expect "rpm: binary gone" [ ! -e "$root/usr/bin/keysync" ]
expect "rpm: drop-in gone" absent "$dropin"
expect "rpm: unit disabled" absent "$wants"
expect "rpm: edited config saved" [ -e "$root/etc/keysync/config.toml.rpmsave" ]
expect "rpm: key file untouched" [ "$(sha256sum < "$root/root/.ssh/authorized_keys")" = "$keys_sum" ]
expect "rpm: state stays (RPM has no purge)" [ -d "$root/var/lib/keysync/users" ]
expect "rpm: revoked file stays" [ -f "$root$revoked" ]
sshd_ok "rpm erase"
# What packaging/README.md tells an admin to delete by hand after rpm -e.
rm -rf "$root/var/lib/keysync" "$root/etc/keysync"

# ---------------------------------------------------------------------------
# What the scripts ask of a running systemd. ROOT has none, so systemctl and
# deb-systemd-invoke are diverted to a stub that records its arguments (and
# says every unit is active, so the sshd reload path runs too), and
# /run/systemd/system marks systemd as running.
step "with a running systemd (stubbed): start, restart on upgrade, stop on removal"
calls=/tmp/systemd-calls.log
stubbed="/bin/systemctl /usr/bin/deb-systemd-invoke"
for f in $stubbed; do
    in_root dpkg-divert --quiet --local --rename --divert "$f.real" --add "$f"
    # shellcheck disable=SC2016 # the stub expands $0 and $* itself
    printf '#!/bin/sh\necho "${0##*/} $*" >> %s\nexit 0\n' "$calls" > "$root$f"
    chmod 0755 "$root$f"
done
mkdir -p "$root/run/systemd/system"
called() { grep -qxF "$1" "$root$calls" || { cat "$root$calls" >&2; return 1; }; }
not_called() { ! grep -qxF "$1" "$root$calls" || { cat "$root$calls" >&2; return 1; }; }
: > "$root$calls"
in_root dpkg -i /tmp/pkgs/keysync-1.deb
expect "deb install: daemon-reload" called "systemctl --system daemon-reload"
expect "deb install: start" called "deb-systemd-invoke start keysync.service"
expect "deb install: sshd reloaded for the drop-in" called "systemctl reload ssh.service"
: > "$root$calls"
in_root dpkg -i /tmp/pkgs/keysync-2.deb
expect "deb upgrade: restart" called "deb-systemd-invoke restart keysync.service"
expect "deb upgrade: no stop" not_called "deb-systemd-invoke stop keysync.service"
expect "deb upgrade: sshd not reloaded (drop-in unchanged)" not_called "systemctl reload ssh.service"
: > "$root$calls"
in_root dpkg -r keysync
expect "deb remove: stop" called "deb-systemd-invoke stop keysync.service"
expect "deb remove: sshd reloaded without the drop-in" called "systemctl reload ssh.service"
in_root dpkg -P keysync
: > "$root$calls"
rpm_in -i "$root/tmp/pkgs/keysync-1.rpm"
expect "rpm install: enable" called "systemctl enable keysync.service"
expect "rpm install: start" called "systemctl start keysync.service"
: > "$root$calls"
rpm_in -U "$root/tmp/pkgs/keysync-2.rpm"
expect "rpm upgrade: try-restart" called "systemctl try-restart keysync.service"
expect "rpm upgrade: not re-enabled" not_called "systemctl enable keysync.service"
: > "$root$calls"
rpm_in -e keysync
expect "rpm erase: stop" called "systemctl stop keysync.service"
expect "rpm erase: disable" called "systemctl disable keysync.service"
rmdir "$root/run/systemd/system"
for f in $stubbed; do
    rm -f "$root$f"
    in_root dpkg-divert --quiet --local --rename --divert "$f.real" --remove "$f"
done
expect "systemctl restored" in_root systemctl --version

step "all install checks passed"
