use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn load_texts(files: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let owned: Vec<(PathBuf, &str)> = files.iter().map(|(p, t)| (PathBuf::from(p), *t)).collect();
    let refs: Vec<(&Path, &str)> = owned.iter().map(|(p, t)| (p.as_path(), *t)).collect();
    from_texts(&refs)
}

const MAIN: &str = r#"
state_dir = "/var/lib/keysync"

[sources.account]
kind = "vast"
api_key_env = "MY_KEY"
interval = "60s"

[[users]]
name = "root"
sources = ["account"]
"#;

#[test]
fn defaults_fill_in() {
    let s = load_texts(&[("/etc/keysync/config.toml", MAIN)]).unwrap();
    let src = &s.sources["account"];
    assert_eq!(src.interval, Duration::from_secs(60));
    assert_eq!(src.jitter, Duration::from_secs(10));
    assert_eq!(src.timeout, Duration::from_secs(10));
    assert_eq!(src.max_body, 4 << 20);
    assert_eq!(src.max_backoff, Duration::from_secs(300));
    assert_eq!(src.resync, Duration::from_secs(600));
    match &src.kind {
        SourceKind::Vast { url, api_key } => {
            assert_eq!(url, DEFAULT_VAST_URL);
            assert_eq!(api_key.api_key_env, "MY_KEY");
        }
        other => panic!("wrong kind {other:?}"),
    }
    assert_eq!(s.users[0].write, WriteMode::Block);
    assert_eq!(s.users[0].path.as_deref(), Some("~/.ssh/authorized_keys"));
    assert_eq!(s.health_socket, PathBuf::from("/run/keysync/health.sock"));
    assert_eq!(s.policy.keys.min_rsa_bits, 2048);
    assert_eq!(s.policy.confirm_delay, Duration::from_secs(5));
    assert!(s.policy.max_stale.is_none());
    assert_eq!(s.refresh_min_interval, Duration::from_secs(5));
}

#[test]
fn refresh_min_interval_is_a_top_level_duration_zero_turns_it_off() {
    let off = format!("refresh_min_interval = \"0s\"\n{MAIN}");
    let s = load_texts(&[("/c.toml", &off)]).unwrap();
    assert_eq!(s.refresh_min_interval, Duration::ZERO);
    assert!(
        s.to_redacted_toml()
            .contains("refresh_min_interval = \"0s\""),
        "check-config shows it: {}",
        s.to_redacted_toml()
    );
    // A drop-in overrides the main file.
    let s = load_texts(&[
        ("/c.toml", &off),
        ("/config.d/10.toml", "refresh_min_interval = \"750ms\"\n"),
    ])
    .unwrap();
    assert_eq!(s.refresh_min_interval, Duration::from_millis(750));
    assert!(
        s.to_redacted_toml()
            .contains("refresh_min_interval = \"750ms\""),
        "{}",
        s.to_redacted_toml()
    );
    // A bad value names the file that set it, its line and the field.
    let err = load_texts(&[
        ("/c.toml", MAIN),
        ("/config.d/10.toml", "\nrefresh_min_interval = \"often\"\n"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/config.d/10.toml, line 2: refresh_min_interval"),
        "{err}"
    );
}

#[test]
fn dropins_merge_key_by_key_later_wins_users_append_or_replace() {
    let d1 = r#"
[sources.account]
interval = "5s"
[[users]]
name = "alice"
sources = ["account"]
write = "fragment"
"#;
    let d2 = r#"
[sources.account]
jitter = "0s"
[sources.account2]
kind = "file"
path = "/etc/keys"
[[users]]
name = "root"
sources = ["account", "account2"]
write = "none"
"#;
    let s = load_texts(&[
        ("/m.toml", MAIN),
        ("/config.d/10-a.toml", d1),
        ("/config.d/20-b.toml", d2),
    ])
    .unwrap();
    let src = &s.sources["account"];
    // d1 set interval, d2 set jitter; the main file's api_key_env survives.
    assert_eq!(src.interval, Duration::from_secs(5));
    assert_eq!(src.jitter, Duration::ZERO);
    assert!(
        matches!(&src.kind, SourceKind::Vast { api_key, .. } if api_key.api_key_env == "MY_KEY")
    );
    // root replaced in place (keeps its position), alice appended.
    let names: Vec<_> = s.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["root", "alice"]);
    assert_eq!(s.users[0].write, WriteMode::None);
    assert_eq!(s.users[0].sources, ["account", "account2"]);
    assert_eq!(s.users[1].write, WriteMode::Fragment);
}

#[test]
fn dropin_directory_is_read_in_lexical_order() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.toml");
    std::fs::write(&main, MAIN).unwrap();
    std::fs::create_dir(dir.path().join("config.d")).unwrap();
    std::fs::write(
        dir.path().join("config.d/b.toml"),
        "[sources.account]\ninterval = \"2s\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.d/a.toml"),
        "[sources.account]\ninterval = \"1s\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("config.d/c.txt"), "not toml at all [").unwrap();
    let s = load(&main).unwrap();
    assert_eq!(s.sources["account"].interval, Duration::from_secs(2));
    assert_eq!(s.files.len(), 3);
}

#[test]
fn unknown_key_names_file_line_and_field() {
    let bad = "state_dir = \"/x\"\n\n[policy]\nmin_rsa_bit = 2048\n";
    let err = load_texts(&[("/etc/keysync/config.toml", bad)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/etc/keysync/config.toml"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("min_rsa_bit"), "{err}");
}

#[test]
fn bad_duration_names_file_line_and_field() {
    let bad = MAIN.replace("interval = \"60s\"", "interval = \"soon\"");
    let err = load_texts(&[("/c.toml", &bad)]).unwrap_err().to_string();
    assert!(
        err.contains("/c.toml, line 7: sources.account.interval"),
        "{err}"
    );
    let zero = MAIN.replace("interval = \"60s\"", "interval = \"0s\"");
    let err = load_texts(&[("/c.toml", &zero)]).unwrap_err().to_string();
    assert!(err.contains("greater than zero"), "{err}");
}

#[test]
fn sub_second_intervals_are_accepted() {
    let fast = MAIN.replace("interval = \"60s\"", "interval = \"250ms\"");
    let s = load_texts(&[("/c.toml", &fast)]).unwrap();
    assert_eq!(s.sources["account"].interval, Duration::from_millis(250));
}

#[test]
fn undefined_source_is_an_error_in_the_dropin_that_names_it() {
    let d = "[[users]]\nname = \"bob\"\nsources = [\"nope\"]\n";
    let err = load_texts(&[("/m.toml", MAIN), ("/config.d/x.toml", d)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/config.d/x.toml, line 3"), "{err}");
    assert!(err.contains("undefined source \"nope\""), "{err}");
}

#[test]
fn plain_http_only_to_loopback() {
    for (url, ok) in [
        ("http://127.0.0.1:8080/api/v0/ssh/", true),
        ("http://[::1]:8080/x", true),
        ("http://localhost/x", true),
        ("http://10.0.0.1/x", false),
        ("http://example.com/x", false),
        ("https://example.com/x?q=1", true),
        ("ftp://example.com/x", false),
    ] {
        let text = MAIN.replace(
            "kind = \"vast\"",
            &format!("kind = \"vast\"\nurl = \"{url}\""),
        );
        assert_eq!(load_texts(&[("/c.toml", &text)]).is_ok(), ok, "{url}");
    }
}

#[test]
fn url_kept_exactly_with_query() {
    let text = MAIN.replace(
        "kind = \"vast\"",
        "kind = \"vast\"\nurl = \"https://h.example/api/v0/ssh/?owner=me&x=1\"",
    );
    let s = load_texts(&[("/c.toml", &text)]).unwrap();
    assert!(
        matches!(&s.sources["account"].kind, SourceKind::Vast { url, .. } if url == "https://h.example/api/v0/ssh/?owner=me&x=1")
    );
}

#[test]
fn ssh_dss_and_unknown_algorithms_refused() {
    let text = format!("{MAIN}\n[policy]\nallowed_algorithms = [\"ssh-ed25519\", \"ssh-dss\"]\n");
    assert!(
        load_texts(&[("/c.toml", &text)])
            .unwrap_err()
            .to_string()
            .contains("ssh-dss")
    );
    let text =
        format!("{MAIN}\n[policy]\nallowed_algorithms = [\"ssh-ed25519\"]\nmax_stale = \"24h\"\n");
    let s = load_texts(&[("/c.toml", &text)]).unwrap();
    assert_eq!(s.policy.keys.allowed_algorithms, ["ssh-ed25519"]);
    assert_eq!(s.policy.max_stale, Some(Duration::from_secs(86400)));
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
    assert_eq!(parse_size("100").unwrap(), 100);
    assert_eq!(parse_size("2 KiB").unwrap(), 2048);
    assert!(parse_size("lots").is_err());
    assert!(parse_size("99999999999999999999GiB").is_err());
}

#[test]
fn check_config_output_has_no_secret_and_round_trips_kinds() {
    let text = MAIN.replace(
        "kind = \"vast\"",
        "kind = \"vast\"\nurl = \"https://u:hunter2@h.example/api/v0/ssh/\"",
    );
    let s = load_texts(&[("/c.toml", &text)]).unwrap();
    let out = s.to_redacted_toml();
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("kind = \"vast\""), "{out}");
    assert!(out.contains("interval = \"1m\""), "{out}");
}

#[test]
fn every_shipped_example_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for dir in ["examples", "packaging"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                from_texts(&[(&path, &text)]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
    }
    assert!(seen >= 1, "no example config found");
}

#[test]
fn user_options_must_end_where_sshd_ends_them() {
    let with = |options: &str| {
        let text = format!("{MAIN}options = '{options}'\n");
        load_texts(&[("/etc/keysync/config.toml", &text)]).map(|s| s.users[0].options.clone())
    };
    assert_eq!(
        with(r#"restrict,command="echo a b""#).unwrap().as_deref(),
        Some(r#"restrict,command="echo a b""#)
    );
    assert_eq!(
        with(r#"command="say \"hi there\"""#).unwrap().as_deref(),
        Some(r#"command="say \"hi there\"""#)
    );
    // A quote left open would swallow the key's own options and its type:
    // sshd would read another key, or none.
    for bad in [
        r#"command="x"#,
        r#"command="x\\" ssh-ed25519"#,
        r#"no-pty "x""#,
        "no-pty no-x11",
    ] {
        let err = with(bad).expect_err(bad).to_string();
        assert!(err.contains("users[root].options"), "{err}");
    }
}

#[test]
fn metrics_textfile_and_listen_are_off_by_default_and_checked() {
    let s = load_texts(&[("/m.toml", MAIN)]).unwrap();
    assert_eq!(s.metrics_textfile, None);
    assert_eq!(s.metrics_listen, None);

    let top = "metrics_textfile = \"/var/lib/prometheus/node-exporter/keysync.prom\"\nmetrics_listen = \"127.0.0.1:9273\"\n";
    let s = load_texts(&[("/m.toml", &format!("{top}{MAIN}"))]).unwrap();
    assert_eq!(
        s.metrics_textfile.as_deref(),
        Some(Path::new("/var/lib/prometheus/node-exporter/keysync.prom"))
    );
    assert_eq!(s.metrics_listen, Some("127.0.0.1:9273".parse().unwrap()));
    // A drop-in wins, and IPv6 works.
    let d = "metrics_listen = \"[::1]:9100\"\n";
    let s = load_texts(&[
        ("/m.toml", &format!("{top}{MAIN}")),
        ("/config.d/m.toml", d),
    ])
    .unwrap();
    assert_eq!(s.metrics_listen, Some("[::1]:9100".parse().unwrap()));

    for (line, field, why) in [
        (
            "metrics_textfile = \"keysync.prom\"",
            "metrics_textfile",
            "absolute",
        ),
        (
            "metrics_textfile = \"/var/lib/keysync.txt\"",
            "metrics_textfile",
            ".prom",
        ),
        (
            "metrics_listen = \"localhost:9273\"",
            "metrics_listen",
            "IP address and port",
        ),
        (
            "metrics_listen = \"127.0.0.1\"",
            "metrics_listen",
            "IP address and port",
        ),
    ] {
        let dropin = format!("\n\n{line}\n");
        let err = load_texts(&[("/m.toml", MAIN), ("/config.d/50-metrics.toml", &dropin)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/config.d/50-metrics.toml, line 3"), "{err}");
        assert!(err.contains(field) && err.contains(why), "{err}");
    }
}
