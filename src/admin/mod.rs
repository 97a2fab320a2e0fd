//! The admin listener (HTTP/1.1, parsed with httparse): health and readiness for now.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::handshake::error_response;
use crate::worker::Env;

const MAX_HEAD: usize = 16 * 1024;

/// Serves admin requests on `listener` until the process exits, one thread.
pub fn spawn(listener: TcpListener, env: Arc<Env>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("arcgate-admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve(stream, &env) {
                    tracing::debug!(error = %e, "admin request failed");
                }
            }
        })?;
    Ok(())
}

fn serve(mut stream: TcpStream, env: &Env) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let response = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break route(req.method.unwrap_or(""), req.path.unwrap_or(""), env);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                break error_response(431, "request head too large", &[]).to_vec()
            }
            Err(_) => break error_response(400, "malformed HTTP request", &[]).to_vec(),
        }
    };
    stream.write_all(&response)
}

fn text(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn route(method: &str, path: &str, env: &Env) -> Vec<u8> {
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/healthz") => text(200, "OK", "ok\n"),
        ("GET", "/readyz") if env.lifecycle.draining.load(Ordering::Relaxed) => {
            text(503, "Service Unavailable", "draining\n")
        }
        ("GET", "/readyz") => text(200, "OK", "ready\n"),
        (_, "/healthz" | "/readyz") => error_response(405, "use GET", &[("Allow", "GET")]).to_vec(),
        _ => error_response(404, "no such route", &[]).to_vec(),
    }
}
