//! `keysync run [--config PATH] [--once]`.

use std::path::Path;

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::logging::{self, LogFormat};

pub fn main(config: &Path, once: bool, log_format: LogFormat) -> u8 {
    logging::init(log_format);
    let settings = match crate::config::load(config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("keysync: {e}");
            return EXIT_USAGE;
        }
    };
    drop_supplementary_groups();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keysync: cannot start the runtime: {e}");
            return EXIT_FAILED;
        }
    };
    // SIGTERM/SIGINT are taken over first (a stop right after the start is
    // then a clean stop, not the default action), then one agent per state dir.
    let shutdown = if once {
        None
    } else {
        match runtime.block_on(async { crate::agent::signals::shutdown() }) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("keysync: cannot handle signals: {e}");
                return EXIT_FAILED;
            }
        }
    };
    let _lock = match take_state_dir(&settings.state_dir) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("keysync: {e}");
            return EXIT_USAGE;
        }
    };
    let Some(shutdown) = shutdown else {
        let ok = runtime.block_on(crate::agent::run_once(settings));
        return if ok { EXIT_OK } else { EXIT_FAILED };
    };
    let daemon = crate::agent::run(settings, shutdown, crate::systemd::Notifier::from_env());
    match runtime.block_on(daemon) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("keysync: {e:#}");
            EXIT_FAILED
        }
    }
}

/// Makes the state dir if needed and takes its lock (`crate::lock`).
/// The revoked keys file is made first of all (sshd refuses every key while
/// the file its `RevokedKeys` names is missing), even when another agent
/// holds the lock: creating a missing empty file cannot hurt that one.
fn take_state_dir(dir: &Path) -> Result<crate::lock::StateLock, String> {
    let state = crate::state::StateDir::new(dir);
    state
        .ensure()
        .map_err(|e| format!("cannot create state_dir {}: {e}", dir.display()))?;
    if let Err(e) = state.ensure_revoked_keys() {
        tracing::error!(
            "cannot create the revoked keys file in {}: {e}; sshd refuses every key while it is missing",
            dir.display()
        );
    }
    crate::lock::acquire(dir).map_err(|e| e.to_string())
}

/// Inside a user's home the agent acts with the user's fsuid/fsgid; the
/// supplementary groups it was started with would still apply there (a hard
/// link the user planted could then copy a file of one of those groups into
/// the home), so a root agent drops them all before any thread starts.
/// The shipped unit starts it with none (and its syscall filter denies
/// setgroups), so there this is a no-op.
fn drop_supplementary_groups() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    match nix::unistd::getgroups() {
        Ok(groups) if groups.is_empty() => {}
        Ok(groups) => {
            if let Err(e) = nix::unistd::setgroups(&[]) {
                tracing::warn!(
                    groups = groups.len(),
                    "cannot drop the {} supplementary group(s) the agent was started with ({e}); start it without them (as the shipped unit does)",
                    groups.len()
                );
            }
        }
        Err(e) => tracing::warn!("cannot read the agent's supplementary groups: {e}"),
    }
}
