//! Debian's nginx running the shipped fleet recipe (packaging/fleet/nginx.conf)
//! on 127.0.0.1, with only its `SITE:` values changed: the list cache and
//! nchan in front of a fake control plane. Used by tests/it/fleet_nginx.rs
//! and benches/fanout.rs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::files::chmod;
use super::{DEADLINE, eventually};

pub const NGINX: &str = "/usr/sbin/nginx";
pub const NCHAN: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";
pub const RECIPE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/fleet/nginx.conf");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a port")
        .port()
}

/// nginx running the shipped recipe, with only its `SITE:` values changed.
pub struct Nginx {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    pub publish_port: u16,
}

impl Nginx {
    pub fn start(origin: u16) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        // The workers (user nobody under root) reach the cache through it.
        chmod(dir.path(), 0o755);
        let (port, publish_port) = (free_port(), free_port());
        let d = dir.path().display().to_string();
        let recipe = std::fs::read_to_string(RECIPE).expect("read the recipe");
        let conf = recipe
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:9000", &format!("127.0.0.1:{origin}"))
            .replace("127.0.0.1:8081", &format!("127.0.0.1:{publish_port}"))
            .replace("/var/cache/nginx/keysync", &format!("{d}/cache"))
            .replace("/run/nginx-keysync.pid", &format!("{d}/nginx.pid"))
            .replace("/var/log/nginx/keysync", &format!("{d}/log"));
        assert!(
            !conf.contains("127.0.0.1:8080") && conf.contains(&format!("{d}/cache")),
            "the recipe's SITE: values moved; update this test"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("write nginx.conf");
        let mut nginx = Nginx {
            dir,
            child: None,
            port,
            publish_port,
        };
        nginx.spawn();
        nginx
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    fn spawn(&mut self) {
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.conf())
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        self.child = Some(child);
        let up = eventually(DEADLINE, || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && TcpStream::connect(("127.0.0.1", self.publish_port)).is_ok()
        });
        assert!(up, "nginx does not listen:\n{}", self.log());
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            if !eventually(DEADLINE, || matches!(child.try_wait(), Ok(Some(_)))) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// nginx's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path("error")).unwrap_or_default()
    }

    /// Where the recipe's `error` or `access` log is.
    pub fn log_path(&self, which: &str) -> PathBuf {
        self.dir.path().join(format!("log-{which}.log"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What the origin does on every change: one message to nchan.
    pub fn publish(&self) {
        let mut conn =
            TcpStream::connect(("127.0.0.1", self.publish_port)).expect("connect to publisher");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        conn.write_all(
            b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n\
              Content-Length: 7\r\nConnection: close\r\n\r\nchanged",
        )
        .expect("publish");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 20"),
            "nchan refused the message: {answer}\n{}",
            self.log()
        );
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What this machine lacks to run the recipe, if anything.
pub fn missing() -> Option<&'static str> {
    if !Path::new(NGINX).exists() {
        Some("nginx is not installed (apt-get install nginx)")
    } else if !Path::new(NCHAN).exists() {
        Some("nchan is not installed (apt-get install libnginx-mod-nchan)")
    } else {
        None
    }
}
