//! A stand-alone fake control plane for demos and manual testing.
//!
//! ```text
//! cargo run --example fake-control-plane -- [--listen 127.0.0.1:8787] [--keys FILE] [--token TOKEN]
//!                                           [--shape array-key|array-public-key|object-ssh-keys]
//!                                           [--heartbeat SECS]
//! ```
//!
//! Serves the keys of FILE (one per line; blank lines and `#` comments are
//! skipped) or, without `--keys`, the fixture keys. FILE is re-read every
//! second: edit it and watch an agent pick up the change through the event
//! stream. Each request is printed as it is seen. Runs until Ctrl-C.

#![allow(dead_code)]

#[path = "../tests/it/support/fake_cp.rs"]
mod fake_cp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use fake_cp::{FakeControlPlane, Shape};

const USAGE: &str = "usage: fake-control-plane [--listen ADDR] [--keys FILE] [--token TOKEN] \
[--shape array-key|array-public-key|object-ssh-keys] [--heartbeat SECS]";

struct Args {
    listen: SocketAddr,
    keys: Option<PathBuf>,
    token: Option<String>,
    shape: Shape,
    heartbeat: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
        keys: None,
        token: None,
        shape: Shape::ArrayKey,
        heartbeat: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                args.listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--keys" => args.keys = Some(PathBuf::from(value()?)),
            "--token" => args.token = Some(value()?),
            "--shape" => {
                let v = value()?;
                args.shape = Shape::from_name(&v).ok_or_else(|| format!("--shape {v}: unknown"))?;
            }
            "--heartbeat" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("--heartbeat {v}: not a positive number"))?;
                args.heartbeat = Some(Duration::from_secs_f64(secs));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// The keys of a file in authorized_keys style, or why it could not be read.
fn read_keys(path: &PathBuf) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("fake-control-plane: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let cp = match FakeControlPlane::start_on(args.listen).await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("fake-control-plane: listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    cp.set_shape(args.shape);
    cp.set_token(args.token.as_deref());
    if let Some(interval) = args.heartbeat {
        cp.set_heartbeat(interval);
    }
    // Without a file: exactly fixtures/control-plane/list-array-key.json
    // (alice and bob, plus a soft-deleted key).
    let mut current = Vec::new();
    match &args.keys {
        Some(path) => match read_keys(path) {
            Ok(keys) => {
                cp.set_keys(keys.clone());
                current = keys;
            }
            Err(e) => {
                eprintln!("fake-control-plane: {e}");
                return ExitCode::from(1);
            }
        },
        None => cp.load_fixture(),
    }

    println!("list:   {}", cp.url());
    println!("events: {}", cp.events_url());
    match &args.token {
        Some(_) => println!("auth:   Authorization: Bearer <the --token value>"),
        None => println!("auth:   none required"),
    }
    println!(
        "serving {} key(s), generation {}{}",
        cp.keys().len(),
        cp.generation(),
        match &args.keys {
            Some(p) => format!(" from {} (re-read every second)", p.display()),
            None => " (the fixture keys; --keys FILE to serve your own)".to_owned(),
        }
    );

    let started = Instant::now();
    let mut printed = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
        }
        if let Some(path) = &args.keys {
            match read_keys(path) {
                Ok(keys) if keys != current => {
                    cp.set_keys(keys.clone());
                    current = keys;
                    println!(
                        "{} changed: {} key(s), generation {}",
                        path.display(),
                        current.len(),
                        cp.generation()
                    );
                }
                Ok(_) => {}
                // Keep serving the last keys while the file is being replaced.
                Err(e) => eprintln!("fake-control-plane: {e} (keeping the last keys)"),
            }
        }
        let log = cp.requests();
        for r in log.iter().skip(printed) {
            let status = r
                .status
                .map_or_else(|| "closed".to_owned(), |s| s.to_string());
            println!(
                "{:>9.3}s {} {} -> {}{}{}",
                r.at.duration_since(started).as_secs_f64(),
                r.method,
                r.path,
                status,
                if r.sent_if_none_match() {
                    " (conditional)"
                } else {
                    ""
                },
                match &r.last_event_id {
                    Some(id) => format!(" (Last-Event-ID {id})"),
                    None => String::new(),
                }
            );
        }
        printed = log.len();
    }
    println!("shutting down");
    cp.shutdown().await;
    ExitCode::SUCCESS
}
