#!/bin/sh
# keysync %post ($1: 1 = first install, 2 = upgrade). The same steps as the
# .deb's postinst (packaging/deb/postinst), in RPM terms: the unit is enabled
# on first install only, so an admin's `systemctl disable` survives upgrades;
# it is started on first install and restarted on upgrade (in %postun of the
# old package) when systemd runs.

if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/keysync.conf || :
fi
if ! getent passwd keysync >/dev/null; then
    if getent group keysync >/dev/null; then
        useradd --system --gid keysync --home-dir / --no-create-home \
            --shell /usr/sbin/nologin --comment "keysync SSH AuthorizedKeysCommand user" keysync || :
    else
        useradd --system --user-group --home-dir / --no-create-home \
            --shell /usr/sbin/nologin --comment "keysync SSH AuthorizedKeysCommand user" keysync || :
    fi
fi

if ! { command -v systemd-tmpfiles >/dev/null 2>&1 \
    && systemd-tmpfiles --create /usr/lib/tmpfiles.d/keysync.conf; }; then
    mkdir -p /etc/keysync /var/lib/keysync/users /run/keysync
    chown root:root /etc/keysync
    chmod 0750 /etc/keysync
    chown root:keysync /var/lib/keysync /var/lib/keysync/users /run/keysync || :
    chmod 0750 /var/lib/keysync
    chmod 2750 /var/lib/keysync/users /run/keysync
    if [ ! -e /var/lib/keysync/revoked_keys ]; then
        (umask 022 && : >> /var/lib/keysync/revoked_keys)
        chown root:root /var/lib/keysync/revoked_keys
        chmod 0644 /var/lib/keysync/revoked_keys
    fi
fi

# After the RevokedKeys file above (tmpfiles.d creates it too): the hook
# links a drop-in naming it, and sshd refuses every key while it is missing.
/usr/libexec/keysync/sshd-hook auto || :

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    # Offline (chroot, image build) this only creates the symlinks.
    systemctl enable keysync.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl start keysync.service || :
    fi
fi
exit 0
