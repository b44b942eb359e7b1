//! An HTTP/1.1 client on hyper, for the agent's health socket (DESIGN.md
//! §8: `/healthz`, `/readyz`, `/status`, `/metrics` over a Unix socket) and
//! for reading back what the fake control plane serves on TCP.
//!
//! Every call is blocking: it runs one exchange on a current-thread runtime
//! of its own, so the blocking test bodies can call it between `eventually`
//! polls without reaching for the runtime that serves the fake. An answer
//! must be HTTP/1.1 with a body that is whole (hyper checks the framing) and
//! UTF-8; anything else is an error, as it would be for a real client.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::metrics::{Exposition, Format, parse_exposition};

/// How long one exchange may take, connect to last body byte.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A whole answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Response {
    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request: method, path, extra headers and a body.
struct Call<'a> {
    method: Method,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: &'a str,
}

/// Sends `call` on a new connection over `stream` and reads the whole answer.
async fn exchange<S>(stream: S, call: Call<'_>) -> Result<Response, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // Drives the connection; it ends with the exchange or with the runtime.
    tokio::spawn(conn);
    let mut request = Request::builder()
        .method(call.method)
        .uri(call.path)
        .header(header::HOST, "localhost");
    for (name, value) in call.headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(call.body.as_bytes())))
        .map_err(|e| format!("request: {e}"))?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let (parts, body) = answer.into_parts();
    if parts.version != Version::HTTP_11 {
        return Err(format!("not HTTP/1.1: {:?}", parts.version));
    }
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let body = String::from_utf8(body.to_vec()).map_err(|e| format!("body not UTF-8: {e}"))?;
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// Runs one exchange to completion on a runtime of its own, within [`TIMEOUT`].
fn run<F: Future<Output = Result<Response, String>>>(exchange: F) -> Result<Response, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
    })
}

fn on_socket(socket: &Path, call: Call<'_>) -> Result<Response, String> {
    run(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        exchange(stream, call).await
    })
}

/// `GET path` on the health socket, optionally with an `Accept` header.
pub fn try_get(socket: &Path, path: &str, accept: Option<&str>) -> Result<Response, String> {
    let accept: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    on_socket(
        socket,
        Call {
            method: Method::GET,
            path,
            headers: &accept,
            body: "",
        },
    )
}

/// `GET path`; panics when nothing answers or the answer is not well-formed.
pub fn get(socket: &Path, path: &str) -> Response {
    get_accepting(socket, path, None)
}

/// [`get`] with an `Accept` header (or none).
pub fn get_accepting(socket: &Path, path: &str, accept: Option<&str>) -> Response {
    try_get(socket, path, accept)
        .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", socket.display()))
}

/// `POST path` with a body; panics like [`get`].
pub fn post(socket: &Path, path: &str, body: &str) -> Response {
    on_socket(
        socket,
        Call {
            method: Method::POST,
            path,
            headers: &[("content-type", "text/plain")],
            body,
        },
    )
    .unwrap_or_else(|e| panic!("POST {path} on {}: {e}", socket.display()))
}

/// The status of `GET path`, or None when nothing answers.
fn status_of(socket: &Path, path: &str) -> Option<u16> {
    try_get(socket, path, None).ok().map(|r| r.status)
}

/// The status code of `/healthz`, or None when nothing answers.
pub fn healthz(socket: &Path) -> Option<u16> {
    status_of(socket, "/healthz")
}

/// The status code of `/readyz`, or None when nothing answers.
pub fn readyz(socket: &Path) -> Option<u16> {
    status_of(socket, "/readyz")
}

/// `/metrics` in the Prometheus text format, parsed strictly; panics when
/// nothing answers or the text is not well-formed.
pub fn metrics(socket: &Path) -> Exposition {
    let text = get(socket, "/metrics").body;
    parse_exposition(&text, Format::Prometheus).expect("metrics")
}

/// One sample of `/metrics`; None when nothing answers or there is no such series.
pub fn try_metric(socket: &Path, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = try_get(socket, "/metrics", None).ok()?.body;
    parse_exposition(&text, Format::Prometheus)
        .expect("metrics")
        .value(name, labels)
}

/// `GET path` on a TCP server (the fake control plane) with extra headers.
pub fn get_tcp(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    run(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        exchange(
            stream,
            Call {
                method: Method::GET,
                path,
                headers,
                body: "",
            },
        )
        .await
    })
    .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}
