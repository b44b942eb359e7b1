//! The command line (DESIGN.md §3): one file per subcommand.
//!
//! Exit codes: 0 ok; 1 a sync or check failed; 2 bad config or usage.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

pub mod authorized_keys;
pub mod check_config;
pub mod entry;
pub mod run;
pub mod status;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "keysync", version, about = "SSH authorized-keys sync agent", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (under systemd: Type=notify).
    Run {
        /// Main config file; `config.d/*.toml` beside it are merged in.
        #[arg(long, env = "KEYSYNC_CONFIG", default_value = crate::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// One sync pass, then exit (0 ok, 1 any source or user failed).
        #[arg(long)]
        once: bool,
        /// Format of log lines on stderr (the journal gets native fields).
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
    },
    /// sshd AuthorizedKeysCommand: print USER's cached keys.
    ///
    /// With FPR, only that key; when it is not in the cache, the running
    /// agent is asked for one refresh (at most 2 s) and the cache read again.
    AuthorizedKeys {
        /// Where the agent keeps its caches.
        #[arg(long, default_value = authorized_keys::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The agent's health socket, asked for a refresh when FPR is not cached.
        #[arg(long, default_value = authorized_keys::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The user sshd asks about (%u).
        user: String,
        /// Only the key with this SHA256 fingerprint (%f).
        fingerprint: Option<String>,
    },
    /// Ask a running agent how it is doing.
    Status {
        /// The agent's health socket.
        #[arg(long, default_value = "/run/keysync/health.sock")]
        socket: PathBuf,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
        /// Exit 0 only when the agent is ready (for HEALTHCHECK).
        #[arg(long)]
        check: bool,
    },
    /// Validate the config and print the effective config, secrets redacted.
    CheckConfig {
        #[arg(long, env = "KEYSYNC_CONFIG", default_value = crate::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Runs a parsed command line; returns the exit code.
pub fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Run {
            config,
            once,
            log_format,
        } => run::main(&config, once, log_format),
        Command::AuthorizedKeys {
            state_dir,
            socket,
            user,
            fingerprint,
        } => authorized_keys::main(&state_dir, &socket, &user, fingerprint.as_deref()),
        Command::Status {
            socket,
            json,
            check,
        } => status::main(&socket, json, check),
        Command::CheckConfig { config } => check_config::main(&config),
    }
}
