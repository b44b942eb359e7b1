//! Helpers for the service tests (service.rs, drift.rs, reload.rs):
//! `keysync status`, and a config writer with the knobs these tests turn.

// Every test file uses a different subset.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

use crate::support::agent::{TestEnv, bin};

/// Runs a synchronous test body off the async runtime that serves the fake
/// control plane, and re-raises its panic with the original message.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// An API key nothing else in the test could contain by accident.
pub fn unique_secret() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ks-SECRET-{}-{nanos:09}", std::process::id())
}

/// `keysync ARGS…` without systemd in the environment.
pub fn keysync(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .expect("run keysync")
}

/// `keysync status --json` for this env's agent, parsed.
pub fn status_json(env: &TestEnv) -> serde_json::Value {
    let out = keysync(&[
        "status",
        "--json",
        "--socket",
        env.socket().to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "keysync status --json: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// `keysync status` (the human form) for this env's agent.
pub fn human_status(env: &TestEnv) -> Output {
    keysync(&["status", "--socket", env.socket().to_str().expect("utf-8")])
}

/// The SHA256 fingerprint of an authorized_keys line, as OpenSSH prints it.
pub fn fingerprint(line: &str) -> String {
    ssh_key::PublicKey::from_openssh(line)
        .expect("public key")
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string()
}
