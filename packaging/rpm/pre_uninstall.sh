#!/bin/sh
# keysync %preun ($1: 0 = erase, 1 = upgrade). On erase: stop and disable
# the service and take away the sshd drop-in keysync placed. On upgrade
# nothing: %postun restarts the service with the new binary.

if [ "$1" -eq 0 ]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable keysync.service >/dev/null 2>&1 || :
        if [ -d /run/systemd/system ]; then
            systemctl stop keysync.service || :
        fi
    fi
    /usr/libexec/keysync/sshd-hook disable || :
fi
exit 0
