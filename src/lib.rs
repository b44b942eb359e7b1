//! keysync: keeps `authorized_keys` equal to the account's saved SSH keys.
//!
//! Data flows one way (DESIGN.md §2): sources fetch key lists, the key policy
//! turns them into validated key sets, the engine unions them per user, and
//! the writer makes the files on disk equal to that.

pub mod agent; // the tasks: fetch loops, the writer, signals, `run --once`
pub mod cli; // one file per subcommand
pub mod config; // fragments -> merged -> validated Settings
pub mod engine; // per-user desired state, mass-removal confirmation, staleness (pure)
pub mod health; // the Unix-socket HTTP server: healthz, readyz, status, metrics
pub mod keys; // parsing, policy, dedup (pure)
pub mod logging; // tracing setup: journald under systemd, stderr otherwise
pub mod render; // key sets -> file bytes: managed block, fragment, cache (pure)
pub mod source; // the KeySource trait and the vast, http and file sources
pub mod state; // last-good answers and per-user caches in state_dir
pub mod status; // the shared status the health socket and STATUS= report
pub mod subscribe; // the SSE stream that triggers fetches
pub mod users; // resolving target users and their paths
pub mod watch; // directory watches bridged from notify
pub mod write; // the atomic, symlink-safe writer: the only code that touches homes
