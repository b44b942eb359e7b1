#!/bin/sh
# keysync %postun ($1: 0 = erase, 1 = upgrade). On upgrade: restart the
# service (as %systemd_postun_with_restart would). On erase: remove the
# runtime directory. RPM has no purge: /var/lib/keysync (last good key sets,
# caches), the API key and a changed config.toml (saved as .rpmsave) stay,
# like the keysync user; packaging/README.md lists what to delete by hand.

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart keysync.service || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rm -rf /run/keysync
fi
exit 0
