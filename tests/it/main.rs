//! keysync's integration tests, one crate: one binary to build and link.
//! Each module is one area of DESIGN.md, run against the real binary;
//! `support/` holds what they share. Run one area with
//! `cargo test --test it <module>::`.

mod support;

mod crash;
mod disk_full;
mod drift;
mod fleet;
mod fleet_nginx;
mod fuzz_replay;
mod health_and_metrics;
mod hook;
mod hostile_fs;
mod hostile_net;
mod packaging;
mod refresh;
mod reload;
mod revocation;
mod revocation_policy;
mod service;
mod smoke;
mod sources;
mod sshd;
mod subscribe;
mod sync_engine;
mod sync_faults;
mod writer_races;
