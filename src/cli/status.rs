//! `keysync status [--socket PATH] [--json] [--check]`: ask a running agent
//! over its health socket. `--check` exits 0 only when the agent is ready,
//! which makes it a Docker HEALTHCHECK.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::{EXIT_FAILED, EXIT_OK};
use crate::status::Status;

/// GETs `path` over the Unix socket; returns (status code, body).
pub async fn get(socket: &Path, path: &str) -> Result<(u16, Vec<u8>), String> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is the agent running?)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let code = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?
        .to_bytes()
        .to_vec();
    Ok((code, body))
}

pub fn main(socket: &Path, json: bool, check: bool) -> u8 {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("keysync status: cannot start the runtime");
        return EXIT_FAILED;
    };
    runtime.block_on(async {
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            if check {
                get(socket, "/readyz").await
            } else {
                get(socket, "/status").await
            }
        })
        .await
        .unwrap_or_else(|_| Err("the agent did not answer within 5 s".into()));
        let (code, body) = match answer {
            Ok(a) => a,
            Err(e) => {
                eprintln!("keysync status: {e}");
                return EXIT_FAILED;
            }
        };
        if check {
            print!("{}", String::from_utf8_lossy(&body));
            return if code == 200 { EXIT_OK } else { EXIT_FAILED };
        }
        if json {
            println!("{}", String::from_utf8_lossy(&body));
            return EXIT_OK;
        }
        match serde_json::from_slice::<Status>(&body) {
            Ok(status) => {
                print!("{}", render(&status));
                EXIT_OK
            }
            Err(e) => {
                eprintln!("keysync status: unexpected answer: {e}");
                EXIT_FAILED
            }
        }
    })
}

fn ago(t: Option<f64>) -> String {
    match t {
        Some(t) => format!("{:.0}s ago", (crate::status::unix_now() - t).max(0.0)),
        None => "never".into(),
    }
}

/// The login-triggered refresh in one line.
fn refresh_line(r: &crate::status::RefreshStatus) -> String {
    if r.min_interval_ms == 0 {
        return format!(
            "refresh: off (refresh_min_interval = 0s), {} asked\n",
            r.off
        );
    }
    format!(
        "refresh: at most one per {:.1}s, last round {}: {} asked, {} served, {} rate limited, {} while in backoff, {} failed\n",
        r.min_interval_ms as f64 / 1000.0,
        ago(r.last_round),
        r.asked,
        r.served,
        r.rate_limited,
        r.backoff,
        r.failed
    )
}

/// One screen for an operator.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "keysync {}: {}\nup {:.0}s, config {}{}\n",
        s.version,
        s.summary,
        s.uptime_seconds,
        s.config.path.display(),
        s.config
            .last_reload_error
            .as_ref()
            .map(|e| format!(" (last reload FAILED: {e})"))
            .unwrap_or_default()
    );
    out.push_str("sources:\n");
    for (name, src) in &s.sources {
        out.push_str(&format!(
            "  {name} ({}, {}): {} keys, last success {}, last attempt {}{}\n",
            src.kind,
            src.mode,
            src.key_count,
            ago(src.last_success),
            ago(src.last_attempt),
            src.last_error
                .as_ref()
                .map(|e| format!("\n    error: {e}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&refresh_line(&s.refresh));
    out.push_str("users:\n");
    for (name, user) in &s.users {
        out.push_str(&format!(
            "  {name} ({}{}): {} keys, last write {}, drift repairs {}{}{}\n",
            user.write_mode,
            user.path
                .as_ref()
                .map(|p| format!(" {}", p.display()))
                .unwrap_or_default(),
            user.fingerprints.len(),
            ago(user.last_write),
            user.drift_repairs,
            user.pending
                .as_ref()
                .map(|p| format!("\n    pending: {p}"))
                .unwrap_or_default(),
            user.last_error
                .as_ref()
                .map(|e| format!("\n    error: {e}"))
                .unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::RefreshStatus;

    #[test]
    fn the_refresh_counts_are_on_the_screen() {
        let mut status = Status {
            refresh: RefreshStatus {
                min_interval_ms: 5_000,
                asked: 9,
                served: 2,
                rate_limited: 6,
                backoff: 1,
                ..RefreshStatus::default()
            },
            ..Status::default()
        };
        let text = render(&status);
        assert!(
            text.contains("refresh: at most one per 5.0s, last round never: 9 asked, 2 served, 6 rate limited, 1 while in backoff, 0 failed\n"),
            "{text}"
        );
        status.refresh = RefreshStatus {
            off: 3,
            ..RefreshStatus::default()
        };
        assert!(
            render(&status).contains("refresh: off (refresh_min_interval = 0s), 3 asked\n"),
            "{}",
            render(&status)
        );
    }
}
