//! Logging through `tracing`: native journald fields under systemd
//! (`JOURNAL_STREAM` set), otherwise human or JSON lines on stderr. The
//! filter comes from `KEYSYNC_LOG` (e.g. `debug`, `keysync=trace`), default `info`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How stderr lines look outside the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEYSYNC_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry.with(journald.with_syslog_identifier("keysync".into())).try_init();
        return;
    }
    let result = match format {
        LogFormat::Human => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
            .try_init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    let _ = result;
}
