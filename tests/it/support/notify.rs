//! The systemd notify socket, played by the test: a datagram socket
//! standing in for `NOTIFY_SOCKET` (sd_notify(3)), whose messages a thread
//! collects for the test to wait on.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`; a thread
/// collects what arrives.
pub struct NotifyInbox {
    path: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
}

impl NotifyInbox {
    pub fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind notify socket");
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = seen.clone();
        // Ends with the test process; blocking reads cost nothing meanwhile.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(msg);
            }
        });
        NotifyInbox {
            path: path.to_path_buf(),
            seen,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every datagram so far, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.seen().iter().filter(|m| pred(m)).count()
    }

    /// Waits until some datagram satisfies `pred`.
    pub fn wait_for(&self, within: Duration, pred: impl Fn(&str) -> bool) -> bool {
        self.wait_for_count(1, within, pred)
    }

    /// Waits until `n` datagrams satisfy `pred`.
    pub fn wait_for_count(&self, n: usize, within: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.count(&pred) >= n {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn is_ping(msg: &str) -> bool {
    msg.lines().any(|l| l == "WATCHDOG=1")
}
