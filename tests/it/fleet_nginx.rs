//! The fleet recipe (packaging/fleet/nginx.conf, DESIGN.md §5 "Beyond one
//! control plane") with Debian's real nginx and nchan on 127.0.0.1: the
//! fake control plane is the origin, it publishes each change to nchan,
//! and several real agents subscribe and fetch through nginx only.
//!
//! Asserted: every change reaches every agent; one change costs the origin
//! at most two list requests however many agents fetch; two changes 300 ms
//! apart both arrive without a resync (the event id in the cache key); after
//! an nginx restart the agents reconnect and the next change arrives. Every
//! "arrives" has a generous deadline; no latency is asserted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::config::{Config, User};
use crate::support::current_user;
use crate::support::env::TestEnv;
use crate::support::fake_cp::{EVENTS_PATH, Endpoint, FakeControlPlane, LIST_PATH};
use crate::support::files::chmod;
use crate::support::scenario::Scenario;
use crate::support::{DEADLINE, can_run, eventually};

const NGINX: &str = "/usr/sbin/nginx";
const NCHAN: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";
const RECIPE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/fleet/nginx.conf");
const AGENTS: usize = 5;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a port")
        .port()
}

/// nginx running the shipped recipe, with only its `SITE:` values changed.
struct Nginx {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    publish_port: u16,
}

impl Nginx {
    fn start(origin: u16) -> Nginx {
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

    fn stop(&mut self) {
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

    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log-error.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What the origin does on every change: one message to nchan.
    fn publish(&self) {
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

fn list_requests(cp: &FakeControlPlane) -> usize {
    cp.requests()
        .iter()
        .filter(|r| r.endpoint == Endpoint::List)
        .count()
}

struct Fleet {
    agents: Vec<(TestEnv, Agent)>,
}

impl Fleet {
    /// `AGENTS` agents, each fetching and subscribing through `nginx` only.
    /// `interval` 2 s: the stream's reconnect backoff after the nginx
    /// restart stays short; with the stream up they poll only every
    /// `resync` (10 min), so an event is what makes them fetch.
    fn start(nginx: &Nginx) -> Fleet {
        let agents = (0..AGENTS)
            .map(|_| {
                let env = TestEnv::new();
                let config = Config::vast(&env, &nginx.url(LIST_PATH))
                    .set("subscribe_url", nginx.url(EVENTS_PATH))
                    .set("interval", "2s")
                    .set("max_backoff", "2s")
                    .set("resync", "10m")
                    .only_user(User::new(&current_user(), "none"));
                env.write_config(config);
                let agent = env.spawn();
                (env, agent)
            })
            .collect();
        Fleet { agents }
    }

    fn all_have(&self, key: &str) -> bool {
        let user = current_user();
        self.agents
            .iter()
            .all(|(env, _)| env.cache(&user).is_some_and(|c| c.contains(key)))
    }

    fn all_connected(&self) -> bool {
        self.agents.iter().all(|(env, _)| {
            env.try_status_json()["sources"]["account"]["stream_connected"]
                == serde_json::Value::Bool(true)
        })
    }

    fn wait_for(&self, key: &str, what: &str, nginx: &Nginx) {
        assert!(
            eventually(DEADLINE, || self.all_have(key)),
            "{what}: not every agent has the key; first agent's log:\n{}\nnginx:\n{}",
            self.agents[0].1.log_tail(),
            nginx.log()
        );
    }
}

fn key(n: u8) -> String {
    // Distinct valid ed25519 keys: a 32-byte blob of one repeated byte.
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[n; 32]);
    format!(
        "ssh-ed25519 {} fleet{n}@test",
        crate::support::fake_cp::base64_encode(&blob)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_recipe_costs_the_origin_two_requests_per_change_and_survives_a_restart() {
    let missing = if !Path::new(NGINX).exists() {
        Some("nginx is not installed (apt-get install nginx)")
    } else if !Path::new(NCHAN).exists() {
        Some("nchan is not installed (apt-get install libnginx-mod-nchan)")
    } else {
        None
    };
    if !can_run("fleet_nginx", missing) {
        return;
    }
    let s = Scenario::new().await;
    s.cp.set_keys([key(1)]);
    s.run(|s| {
        let cp = &s.cp;
        let mut nginx = Nginx::start(cp.addr().port());
        let fleet = Fleet::start(&nginx);
        fleet.wait_for(&key(1), "first sync through the cache", &nginx);
        assert!(
            eventually(DEADLINE, || fleet.all_connected()),
            "not every stream connected through nchan:\n{}",
            nginx.log()
        );

        // One change: the origin publishes, every agent fetches.
        let before = list_requests(cp);
        cp.add_key(&key(2));
        nginx.publish();
        fleet.wait_for(&key(2), "one change", &nginx);
        let cost = list_requests(cp) - before;
        assert!(
            (1..=2).contains(&cost),
            "one change cost the origin {cost} list requests for {AGENTS} agents"
        );

        // Two changes 300 ms apart: the second is not answered from the
        // entry the first filled.
        let before = list_requests(cp);
        cp.add_key(&key(3));
        nginx.publish();
        std::thread::sleep(Duration::from_millis(300));
        cp.add_key(&key(4));
        nginx.publish();
        fleet.wait_for(&key(4), "the second of two changes 300 ms apart", &nginx);
        assert!(fleet.all_have(&key(3)));
        let cost = list_requests(cp) - before;
        assert!(
            (2..=4).contains(&cost),
            "two changes cost the origin {cost} list requests for {AGENTS} agents"
        );

        // nginx restarts (nchan's buffer is gone): the agents reconnect
        // with their Last-Event-ID, and the next change still arrives.
        nginx.restart();
        assert!(
            eventually(Duration::from_secs(60), || fleet.all_connected()),
            "not every agent reconnected after the restart:\n{}",
            nginx.log()
        );
        let before = list_requests(cp);
        cp.add_key(&key(5));
        nginx.publish();
        fleet.wait_for(&key(5), "a change after the restart", &nginx);
        let cost = list_requests(cp) - before;
        assert!(
            cost <= 2 + AGENTS,
            "after the restart one change cost {cost} list requests"
        );
        drop(fleet);
    })
    .await;
}
