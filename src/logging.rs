//! Logging through `tracing`: native journald fields when stderr is the
//! journal (systemd sets `JOURNAL_STREAM`), otherwise human or JSON lines on
//! stderr (`--log-format`). The filter comes from `KEYSYNC_LOG` (e.g.
//! `debug`, `keysync=trace`), default `info`.
//!
//! In the journal an event's fields carry the prefix `KEYSYNC_`, so the key
//! events can be searched by field, e.g.
//! `journalctl -u keysync KEYSYNC_FINGERPRINT=SHA256:…` or `KEYSYNC_USER=root`.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How stderr lines look outside the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Prefix of the journal fields keysync's events carry (`KEYSYNC_USER`, …).
pub(crate) const JOURNAL_FIELD_PREFIX: &str = "KEYSYNC";

pub(crate) fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEYSYNC_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        let journald = journald
            .with_syslog_identifier("keysync".into())
            .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.into()));
        let _ = registry.with(journald).try_init();
        return;
    }
    let result = match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    // Colours only for a person at a terminal: escape codes
                    // in `docker logs` or a log file are noise.
                    .with_ansi(
                        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                    ),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    let _ = result;
}

/// True when stderr is the journal stream systemd connected, not merely a
/// process that inherited `JOURNAL_STREAM` (say, `keysync run 2>file` typed
/// into a shell of a unit): systemd.exec(5) says to compare the variable's
/// `device:inode` with stderr's.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // fstat through a duplicate: std offers metadata only on a File.
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), meta.dev(), meta.ino())
}

fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// An error and its causes, `a: b: c`: "cannot write X" alone does not tell
/// an operator that the disk is full.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(journal_stream_matches("2049:123456", 2049, 123456));
        assert!(!journal_stream_matches("2049:123456", 2049, 123457));
        assert!(!journal_stream_matches("2049:123456", 2050, 123456));
        assert!(!journal_stream_matches("", 2049, 123456));
        assert!(!journal_stream_matches("garbage", 2049, 123456));
    }
}
