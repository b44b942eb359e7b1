//! keysync: keeps `authorized_keys` equal to the account's saved SSH keys.
//!
//! Data flows one way (DESIGN.md §2): sources fetch key lists, the key policy
//! turns them into validated key sets, the engine unions them per user, and
//! the writer makes the files on disk equal to that. `docs/architecture.md`
//! shows the tasks and channels.
//!
//! Modules are `pub` only where the binary's tests, benchmarks, fuzz targets
//! or asset generator reach in; everything else is crate-private.

// Habits kept by the compiler: nothing is `pub` that the crate's users
// cannot reach, and no `unwrap()` outside tests (clippy.toml) except for a
// true invariant, allowed on the spot with a comment.
#![warn(unreachable_pub)]
#![warn(clippy::unwrap_used)]

pub mod agent; // the tasks: fetch loops, the writer, watches, signals, `run --once`
pub(crate) mod backoff; // waits between fetches: jitter and full-jitter backoff (pure)
pub mod board; // the published status, the metrics and the writer's heartbeat
pub(crate) mod cache_index; // the fingerprint index beside each hook cache
pub mod cli; // one file per subcommand
pub mod config; // fragments -> merged -> validated Settings
pub(crate) mod engine; // per-user desired state, mass-removal confirmation, staleness (pure)
pub(crate) mod exporter; // the metrics for Prometheus: metrics_textfile and metrics_listen
pub(crate) mod health; // the Unix-socket HTTP server: healthz, readyz, status, metrics
pub mod keys; // parsing, policy, dedup (pure)
pub mod lock; // one agent per state dir
pub(crate) mod logging; // tracing setup: journald under systemd, stderr otherwise
pub(crate) mod metrics; // the Prometheus registry and its text formats
pub(crate) mod refresh; // POST /refresh: the login-triggered refresh's request, reply and HTTP answer
pub mod render; // key sets -> file bytes: managed block, fragment, cache (pure)
pub mod source; // the KeySource trait, the list formats and the source kinds
pub(crate) mod state; // last-good answers and per-user caches in state_dir
pub mod status; // the status document and its one-line summary
pub mod systemd; // sd_notify: READY, STATUS, WATCHDOG, STOPPING
pub(crate) mod users; // resolving target users and their paths
pub(crate) mod watch; // directory watches bridged from notify
pub mod write; // the atomic, symlink-safe writer: the only code that touches homes
