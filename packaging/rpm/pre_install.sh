#!/bin/sh
# keysync %pre ($1: 1 = first install, 2 = upgrade), as the .deb's preinst:
# before the new files are unpacked, the RevokedKeys file exists wherever a
# drop-in link of keysync's may name it (sshd refuses every public key while
# that file is missing, and the unpack can change the link's target). Empty,
# never truncated; on a first install %post creates it before any link.

revoked=/var/lib/keysync/revoked_keys
linked=no
case "$(readlink /etc/ssh/sshd_config.d/50-keysync.conf 2>/dev/null || :)" in
    /usr/share/keysync/sshd_config.d/*) linked=yes ;;
esac
if [ ! -e "$revoked" ] && { [ "$linked" = yes ] || [ -d /var/lib/keysync ]; }; then
    mkdir -p /var/lib/keysync
    (umask 022 && : >> "$revoked") || :
    chown root:root "$revoked" || :
    chmod 0644 "$revoked" || :
fi
exit 0
