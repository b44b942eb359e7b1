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
    // Before anything else: one agent per state dir.
    let _lock = match take_state_dir(&settings.state_dir) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("keysync: {e}");
            return EXIT_USAGE;
        }
    };
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
    if once {
        let ok = runtime.block_on(crate::agent::run_once(settings));
        return if ok { EXIT_OK } else { EXIT_FAILED };
    }
    let daemon = async {
        let shutdown = crate::agent::signals::shutdown()?;
        crate::agent::run(settings, shutdown, crate::systemd::Notifier::from_env()).await
    };
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
fn take_state_dir(dir: &Path) -> Result<crate::lock::StateLock, String> {
    crate::state::StateDir::new(dir)
        .ensure()
        .map_err(|e| format!("cannot create state_dir {}: {e}", dir.display()))?;
    crate::lock::acquire(dir).map_err(|e| e.to_string())
}
