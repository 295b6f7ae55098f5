//! A loopback HTTP server for the SigV4 adapters' unit tests (`iot`, `jobs`): it answers each
//! request with the next scripted `(status, body)` and keeps what it was sent. A body
//! `"<ErrorType>|<json>"` is answered with that `x-amzn-ErrorType` header, as AWS IoT sends it.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as received.
#[derive(Debug, Clone)]
struct Received {
    /// The request line, as sent (`PUT /jobs/j1 HTTP/1.1`).
    line: String,
    /// The request line and headers, lowercased.
    head: String,
    /// The body, read to its `content-length`.
    body: String,
}

pub(crate) struct Scripted {
    pub url: String,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Scripted {
    pub async fn start(answers: Vec<(u16, &'static str)>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            for (status, body) in answers {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let Some(request) = read_request(&mut conn).await else { return };
                log.lock().unwrap().push(request);
                let (header, body) = match body.split_once('|') {
                    Some((error_type, body)) => (format!("x-amzn-errortype: {error_type}\r\n"), body),
                    None => (String::new(), body),
                };
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{header}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            }
        });
        Self { url, seen }
    }

    /// Each request's line (as sent) and body.
    pub fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().iter().map(|r| (r.line.clone(), r.body.clone())).collect()
    }

    /// Each request's line and headers, lowercased.
    pub fn heads(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|r| r.head.clone()).collect()
    }
}

async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = head.lines().next().unwrap_or_default().to_owned();
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    Some(Received { line, head: head.to_lowercase(), body })
}
