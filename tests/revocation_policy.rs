//! Revocation that holds (DESIGN.md §6): the real `keysync` binary.
//!
//! - Every line keysync writes holds, for OpenSSH (`ssh-keygen -l`, which
//!   splits options with sshd's own code), the key keysync checked and
//!   reports in `/status`, also for options crafted to make the two disagree.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::agent::{TestEnv, bin, eventually};
use support::fake_cp::fixture_keys;

/// Generous deadline for "eventually" conditions on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config with one source table (`source`, without its header) and one
/// user in block mode (root writes [`TestEnv::target`], any other user its
/// own `~/.ssh/authorized_keys`), `user_extra` in its table.
fn config(env: &TestEnv, source: &str, user: &str, user_extra: &str, policy: &str) -> String {
    format!(
        r#"state_dir = "{state}"
health_socket = "{socket}"

[sources.account]
{source}

[[users]]
name = "{user}"
sources = ["account"]
write = "block"
{path}
{user_extra}

[policy]
{policy}
"#,
        state = env.state_dir().display(),
        socket = env.socket().display(),
        path = if user == "root" {
            format!("path = \"{}\"", env.target().display())
        } else {
            String::new()
        },
    )
}

/// `keysync status --json` against the agent's health socket.
fn status_json(env: &TestEnv) -> Option<serde_json::Value> {
    let out = Command::new(bin())
        .args(["status", "--json", "--socket"])
        .arg(env.socket())
        .output()
        .expect("run keysync status");
    serde_json::from_slice(&out.stdout).ok()
}

/// The fingerprints `ssh-keygen -l` reads from a file, in order.
fn ssh_keygen_fingerprints(path: &Path) -> Vec<String> {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen");
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
        .collect()
}

/// An RSA public key line of `bits` made by ssh-keygen, and its fingerprint.
fn rsa_key(dir: &Path, name: &str, bits: u32) -> (String, String) {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "rsa",
            "-b",
            &bits.to_string(),
            "-N",
            "",
            "-C",
            name,
            "-f",
        ])
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    let public = path.with_extension("pub");
    let line = std::fs::read_to_string(&public).expect(".pub");
    let fpr = ssh_keygen_fingerprints(&public).pop().expect("fingerprint");
    (line.trim_end().to_string(), fpr)
}

fn fingerprint_of(dir: &Path, line: &str) -> String {
    let path = dir.join("one.pub");
    std::fs::write(&path, format!("{line}\n")).expect("write key");
    ssh_keygen_fingerprints(&path).pop().expect("fingerprint")
}

fn set(items: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    items.into_iter().collect()
}

// ---------------------------------------------------------------------------
// 1. The key keysync checks is the key sshd uses

#[tokio::test(flavor = "multi_thread")]
async fn every_written_line_holds_the_key_keysync_reports() {
    let env = TestEnv::new();
    let [alice, bob, old] = fixture_keys();
    let (rsa1024, fpr1024) = rsa_key(env.path(), "short", 1024);
    let (rsa2048, fpr2048) = rsa_key(env.path(), "long", 2048);
    let entries = [
        alice.to_string(),
        // Inside quotes sshd escapes `\"` only: `x\\"` is a backslash and
        // an escaped quote, the quote stays open over the ed25519 key, and
        // sshd uses the RSA key after it.
        format!("command=\"x\\\\\" {old}\" {rsa1024}"),
        format!("command=\"y\\\\\" {bob}\" {rsa2048}"),
        format!("restrict,command=\"echo \\\"a b\\\"\" {bob}"),
    ];
    let keys_file = env.path().join("keys");
    std::fs::write(&keys_file, entries.join("\n") + "\n").expect("keys file");
    let source = format!(
        "kind = \"file\"\npath = \"{}\"\ninterval = \"200ms\"\njitter = \"0s\"",
        keys_file.display()
    );
    env.write_config(&config(
        &env,
        &source,
        "root",
        "options = \"no-agent-forwarding\"",
        "allow_source_options = true\nmax_stale = \"24h\"",
    ));

    let agent = env.spawn();
    let want = set([
        fingerprint_of(env.path(), alice),
        fpr2048.clone(),
        fingerprint_of(env.path(), bob),
    ]);
    let mut reported = BTreeSet::new();
    let ok = eventually(DEADLINE, || {
        reported = status_json(&env)
            .and_then(|s| s["users"]["root"]["fingerprints"].as_array().cloned())
            .map(|a| set(a.iter().filter_map(|f| f.as_str().map(str::to_string))))
            .unwrap_or_default();
        reported.len() >= want.len() && env.read_target().is_some()
    });
    assert!(
        ok,
        "status never reported the keys: {reported:?}\n{}",
        agent.log_text()
    );
    assert!(!reported.contains(&fpr1024), "the 1024-bit key is refused");

    let cache = env.state_dir().join("users/root.keys");
    for file in [env.target(), cache] {
        let read = ssh_keygen_fingerprints(&file);
        assert_eq!(
            set(read.clone()),
            reported,
            "{}: OpenSSH reads other keys than keysync reports\n{}",
            file.display(),
            std::fs::read_to_string(&file).unwrap_or_default()
        );
        assert_eq!(read.len(), reported.len(), "one line per key");
    }
    assert_eq!(reported, want);
    drop(agent);
}
