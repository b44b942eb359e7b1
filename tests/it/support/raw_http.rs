//! A raw HTTP/1.1 server on 127.0.0.1 for sources that are not the fake
//! control plane: it reads each request head, logs it, and lets the test
//! write whatever bytes it likes as the answer, well-formed or not (a body
//! dripped, a header a megabyte long), then closes the connection. One
//! thread per connection; the server stops accepting when dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request head as the raw server read it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes the answer to one request.
pub type Answer = dyn Fn(&RawRequest, &mut TcpStream) + Send + Sync;

/// Accepts connections on 127.0.0.1:0, reads each request head, logs it and
/// lets `answer` write whatever it likes; the connection is closed after.
/// Stops accepting on drop.
pub struct RawServer {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<RawRequest>>>,
    stop: Arc<AtomicBool>,
}

impl RawServer {
    pub fn start(answer: Arc<Answer>) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("addr");
        let log: Arc<Mutex<Vec<RawRequest>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = conn else { continue };
                let (log, answer) = (log2.clone(), answer.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let Some(request) = read_head(&stream) else {
                        return;
                    };
                    log.lock().expect("log").push(request.clone());
                    answer(&request, &mut stream);
                    let _ = stream.flush();
                    let _ = stream.shutdown(Shutdown::Both);
                });
            }
        });
        RawServer { addr, log, stop }
    }

    /// `http://127.0.0.1:PORT<path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn read_head(stream: &TcpStream) -> Option<RawRequest> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let path = first.split(' ').nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Some(RawRequest { path, headers })
}

/// A complete answer with a Content-Length.
pub fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}
