//! What the agent serves (DESIGN.md §8) under abuse and to the tools that
//! read it, against the real `keysync` binary: 1,100 idle connections to
//! the health socket neither stall the sync nor keep `/healthz` from a new
//! client; the open-file soft limit is raised at start; the metrics reach
//! Prometheus through `metrics_textfile` (node_exporter's textfile
//! collector) and `metrics_listen`, and `promtool` accepts every form.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::config::Config;
use crate::support::env::TestEnv;
use crate::support::fake_cp::{FakeControlPlane, gen_ed25519_keys};
use crate::support::metrics::FAMILIES;
use crate::support::scenario::with_fake;
use crate::support::{DEADLINE, blocking, eventually};
use tokio::io::AsyncReadExt;

/// `GET path` on the health socket: (status line, whole answer), or None
/// when the agent did not answer within 2 s.
fn health_get(socket: &Path, path: &str) -> Option<(String, String)> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.lines().next()?.to_string();
    Some((status, answer))
}

/// The soft and hard "Max open files" of a process.
fn nofile_limits(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

/// Raises this process's own soft open-file limit (it opens 1,100
/// connections) and returns the hard limit.
fn raise_own_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

// ---------------------------------------------------------------------------
// The health socket under 1,100 idle connections

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_stall_neither_the_sync_nor_healthz() {
    const IDLE: usize = 1_100;
    let hard = raise_own_nofile();
    assert!(
        hard >= 2 * IDLE as u64,
        "the hard open-file limit ({hard}) is too low for this test"
    );
    let keys = gen_ed25519_keys(3);
    let cp = FakeControlPlane::start().await;
    cp.set_token(Some("test-token"));
    cp.set_keys(keys.clone());
    let env = std::sync::Arc::new(TestEnv::new());
    env.write_config(Config::vast(&env, &cp.url()));
    // Started with systemd's default soft limit (1024): fewer descriptors
    // than idle clients, unless the agent raises it to the hard limit.
    let agent = env.spawn_with(|cmd| unsafe {
        cmd.pre_exec(|| {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
            setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard)?;
            Ok(())
        });
    });
    let agent = std::sync::Arc::new(std::sync::Mutex::new(agent));
    {
        let (env, agent, keys) = (env.clone(), agent.clone(), keys.clone());
        blocking(move || {
            let agent = agent.lock().expect("agent");
            assert!(
                eventually(DEADLINE, || env.block_keys() == keys),
                "no first sync; log:\n{}",
                agent.log_tail()
            );
            let (soft, hard) = nofile_limits(agent.pid());
            assert_eq!(
                soft, hard,
                "the agent did not raise its open-file soft limit to the hard limit"
            );
        })
        .await;
    }

    // 1,100 clients connect; half send half a request, none finishes one.
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let connect = tokio::net::UnixStream::connect(env.socket());
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(mut stream)) => {
                if i % 2 == 0 {
                    use tokio::io::AsyncWriteExt;
                    let _ = stream
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                        .await;
                }
                idle.push(stream);
            }
            _ => break,
        }
    }
    eprintln!(
        "{} idle connections opened in {:?}",
        idle.len(),
        opened.elapsed()
    );
    assert_eq!(idle.len(), IDLE, "the socket stopped taking connections");
    // Each waits for the agent to close it.
    let closers: Vec<_> = idle
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                let closed = loop {
                    match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break Some(opened.elapsed()),
                        Ok(Ok(_)) => continue,
                        Err(_) => break None,
                    }
                };
                // The client keeps its end open: only the agent's side closed.
                (stream, closed)
            })
        })
        .collect();

    // Meanwhile a key is deleted on the account: the deletion lands, and a
    // new client gets /healthz within seconds.
    cp.remove_key(&keys[0]);
    {
        let (env, agent, keys) = (env.clone(), agent.clone(), keys.clone());
        blocking(move || {
            let agent = agent.lock().expect("agent");
            assert!(
                eventually(DEADLINE, || env.block_keys() == keys[1..]),
                "the deletion did not land while idle clients held the socket; log:\n{}",
                agent.log_tail()
            );
            let asked = Instant::now();
            assert!(
                eventually(DEADLINE, || health_get(&env.socket(), "/healthz")
                    .is_some_and(|(status, _)| status.contains(" 200 "))),
                "/healthz never answered a new client; log:\n{}",
                agent.log_tail()
            );
            eprintln!("/healthz answered a new client after {:?}", asked.elapsed());
        })
        .await;
    }

    let mut closed = Vec::new();
    let mut held = Vec::new();
    for closer in closers {
        let (stream, at) = closer.await.expect("closer");
        held.push(stream);
        closed.push(at);
    }
    let at_once = closed
        .iter()
        .filter(|at| at.is_some_and(|at| at < Duration::from_secs(4)))
        .count();
    let never = closed.iter().filter(|at| at.is_none()).count();
    let last = closed.iter().flatten().max().copied();
    eprintln!("closed at once: {at_once}, never: {never}, last closed at {last:?}");
    // Over the bound of 64: accepted and closed at once; the 64 within the
    // 5 s deadline for a whole request.
    assert!(
        at_once >= IDLE - 64,
        "only {at_once} of {IDLE} connections over the bound were closed at once"
    );
    assert_eq!(never, 0, "{never} idle connections were never closed");
    assert!(
        last.is_some_and(|l| l < Duration::from_secs(12)),
        "an idle connection was held for {last:?}"
    );
    drop(held);
}

// ---------------------------------------------------------------------------
// The metrics for Prometheus: metrics_textfile and metrics_listen

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A plain HTTP/1.1 request to 127.0.0.1:`port`: (status code, headers, body).
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, head.to_string(), body.to_string()))
}

/// The value of the sample `series` (name and labels exactly as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Checks the text format 0.0.4 line by line: comments are HELP or TYPE,
/// every sample is `name{labels} value` with a known family.
fn assert_prometheus_text(text: &str, what: &str) {
    let mut families = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or_default();
            assert!(
                kind == "HELP" || kind == "TYPE",
                "{what}: odd comment {line:?}"
            );
            if kind == "TYPE" {
                families.push(parts.next().unwrap_or_default().to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("{what}: {line:?}"));
        assert!(
            value.parse::<f64>().is_ok(),
            "{what}: bad value in {line:?}"
        );
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            families.iter().any(|f| name == f
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f))),
            "{what}: sample {name} of no declared family"
        );
    }
    for family in FAMILIES {
        assert!(
            families.iter().any(|f| f == family),
            "{what}: no {family}:\n{text}"
        );
    }
}

/// An agent with both exporters on, synced with 3 keys.
struct Exporting {
    env: TestEnv,
    agent: Agent,
    textfile: std::path::PathBuf,
    port: u16,
}

fn start_exporting(cp: &FakeControlPlane, keys: &[String]) -> Exporting {
    let env = TestEnv::new();
    let dir = env.path().join("textfile-collector");
    std::fs::create_dir(&dir).expect("collector dir");
    let textfile = dir.join("keysync.prom");
    let port = free_port();
    env.write_config(format!(
        "metrics_textfile = \"{}\"\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
        textfile.display(),
        Config::vast(&env, &cp.url())
    ));
    let agent = env.spawn();
    assert!(
        eventually(DEADLINE, || env.block_keys() == keys),
        "no first sync; log:\n{}",
        agent.log_tail()
    );
    Exporting {
        env,
        agent,
        textfile,
        port,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_textfile_and_metrics_listen_carry_the_metrics() {
    let keys = gen_ed25519_keys(3);
    with_fake(keys.clone(), move |cp| {
        let x = start_exporting(cp, &keys);
        let keys_of_root = "keysync_keys{user=\"root\"}";

        // The textfile appears, parses, and follows a change.
        assert!(
            eventually(DEADLINE, || std::fs::read_to_string(&x.textfile)
                .is_ok_and(|t| sample(&t, keys_of_root) == Some(3.0))),
            "no textfile with 3 keys for root; log:\n{}",
            x.agent.log_tail()
        );
        let text = std::fs::read_to_string(&x.textfile).expect("textfile");
        assert_prometheus_text(&text, "metrics_textfile");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&x.textfile)
            .expect("textfile")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "node_exporter must be able to read it");
        cp.remove_key(&keys[0]);
        assert!(
            eventually(DEADLINE, || std::fs::read_to_string(&x.textfile)
                .is_ok_and(|t| sample(&t, keys_of_root) == Some(2.0))),
            "the textfile did not follow the removal; log:\n{}",
            x.agent.log_tail()
        );
        let dir = x.textfile.parent().expect("dir");
        let names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["keysync.prom"],
            "temporary files left beside the textfile"
        );

        // metrics_listen: /metrics, and 404 for everything else.
        let (code, head, body) = http(x.port, "GET", "/metrics").expect("metrics_listen answers");
        assert_eq!(code, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert_prometheus_text(&body, "metrics_listen");
        assert_eq!(sample(&body, keys_of_root), Some(2.0));
        for (method, path) in [
            ("GET", "/"),
            ("GET", "/healthz"),
            ("GET", "/status"),
            ("GET", "/metrics/x"),
            ("POST", "/metrics"),
            ("POST", "/refresh"),
        ] {
            let (code, head, _) = http(x.port, method, path).expect("an answer");
            assert_eq!(code, 404, "{method} {path}: {head}");
        }
        // The health socket still serves the same metrics.
        let (status, answer) = health_get(&x.env.socket(), "/metrics").expect("health socket");
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(sample(&answer, keys_of_root), Some(2.0));
    })
    .await;
}

/// The path of a tool from Debian's `prometheus` or
/// `prometheus-node-exporter` package, or None (said loudly). Under CI as
/// root, where .ci/run installs them, a missing tool fails the test.
fn tool(name: &str, package: &str, test: &str) -> Option<std::path::PathBuf> {
    let path = ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    if path.is_none() {
        assert!(
            !(crate::support::is_root() && std::env::var_os("CI").is_some()),
            "{test} needs {name}: apt-get install -y {package} (CI installs it)"
        );
        eprintln!(
            "\n!!!!! {test}: SKIPPED, {name} is missing (apt-get install -y {package}) !!!!!\n"
        );
    }
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_every_form_of_the_metrics() {
    let Some(promtool) = tool(
        "promtool",
        "prometheus",
        "promtool_accepts_every_form_of_the_metrics",
    ) else {
        return;
    };
    let keys = gen_ed25519_keys(3);
    with_fake(keys.clone(), move |cp| {
        let x = start_exporting(cp, &keys);
        assert!(
            eventually(DEADLINE, || x.textfile.exists()),
            "no textfile; log:\n{}",
            x.agent.log_tail()
        );
        let (_, socket_answer) = health_get(&x.env.socket(), "/metrics").expect("health socket");
        let socket_text = socket_answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .expect("body");
        let (_, _, listen_text) = http(x.port, "GET", "/metrics").expect("metrics_listen");
        let textfile_text = std::fs::read_to_string(&x.textfile).expect("textfile");
        for (what, text) in [
            ("/metrics on the health socket", socket_text),
            ("metrics_listen", listen_text),
            ("metrics_textfile", textfile_text),
        ] {
            let mut child = std::process::Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run promtool");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("feed promtool");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
                "promtool check metrics rejects {what}: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_exporter_serves_the_textfile() {
    let Some(node_exporter) = tool(
        "prometheus-node-exporter",
        "prometheus-node-exporter",
        "node_exporter_serves_the_textfile",
    ) else {
        return;
    };
    let keys = gen_ed25519_keys(3);
    with_fake(keys.clone(), move |cp| {
        let x = start_exporting(cp, &keys);
        let dir = x.textfile.parent().expect("dir").to_path_buf();
        let port = free_port();
        let log = std::fs::File::create(x.env.path().join("node_exporter.log")).expect("log");
        let mut exporter = std::process::Command::new(&node_exporter)
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!("--collector.textfile.directory={}", dir.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start node_exporter");
        let mut scraped = String::new();
        let seen = eventually(DEADLINE, || {
            scraped = http(port, "GET", "/metrics").map(|(_, _, b)| b).unwrap_or_default();
            sample(&scraped, "keysync_keys{user=\"root\"}") == Some(3.0)
        });
        let _ = exporter.kill();
        let _ = exporter.wait();
        let exporter_log =
            std::fs::read_to_string(x.env.path().join("node_exporter.log")).unwrap_or_default();
        assert!(
            seen,
            "node_exporter does not show keysync's metrics:\n{scraped}\nnode_exporter log:\n{exporter_log}"
        );
        assert_eq!(
            sample(&scraped, "node_textfile_scrape_error"),
            Some(0.0),
            "node_exporter could not read the textfile:\n{exporter_log}"
        );
        for series in [
            "keysync_fetch_total{result=\"ok\",source=\"account\"}",
            "keysync_writes_total{user=\"root\"}",
            "keysync_fetch_duration_seconds_count{source=\"account\"}",
        ] {
            assert!(sample(&scraped, series).is_some(), "no {series} in:\n{scraped}");
        }
    })
    .await;
}
