//! A minimal blocking HTTP/1.1 client for checks and timed requests, and `wrk` for load.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use super::BenchResult;

/// Longest wait for any read: a cold miss of 100 MB takes well under this.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Bytes of the head as received: status line, fields and the blank line.
    pub head_len: usize,
    /// From request written to the end of the response head.
    pub head: Duration,
    /// From request written to last body byte read.
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on a new connection to `127.0.0.1:port`; the body goes to `body` (cleared
/// first, its capacity kept, so a timed request need not grow it).
pub fn get(port: u16, path: &str, body: &mut Vec<u8>) -> BenchResult<Response> {
    body.clear();
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let start = Instant::now();
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let (end, head_at) = loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break (i, start.elapsed());
        }
        if head.len() > MAX_HEAD {
            return Err("response head too large".into());
        }
    };
    body.extend_from_slice(&head[end + 4..]);
    let text = String::from_utf8_lossy(&head[..end]);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .ok_or("no Content-Length")?;
    while body.len() < len {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body ended after {} of {len} bytes", body.len()),
            )
            .into());
        }
        body.extend_from_slice(&buf[..n]);
    }
    let elapsed = start.elapsed();
    if body.len() != len {
        return Err(format!("{} body bytes, Content-Length {len}", body.len()).into());
    }
    Ok(Response {
        status,
        headers,
        head_len: end + 4,
        head: head_at,
        elapsed,
    })
}

/// What one `wrk` run reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub requests_per_sec: f64,
    pub requests: u64,
    /// Bytes read per second, as wrk reports `Transfer/sec`.
    pub bytes_per_sec: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

/// Whether `wrk` can be run.
pub fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wrk"))
}

/// `wrk -t<threads> -c<connections> -d<duration> http://127.0.0.1:<port><path>`.
pub fn wrk(
    port: u16,
    path: &str,
    threads: u32,
    connections: u32,
    duration: &str,
) -> BenchResult<Load> {
    let out = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{duration}"))
        .arg("--timeout")
        .arg("10s")
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}").into())
}

fn parse_wrk(text: &str) -> Option<Load> {
    let mut load = Load::default();
    let mut seen_rps = false;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            load.requests_per_sec = v.trim().parse().ok()?;
            seen_rps = true;
        } else if let Some(v) = line.strip_prefix("Transfer/sec:") {
            load.bytes_per_sec = parse_size(v.trim())?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.non_2xx = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            load.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some((n, rest)) = line.split_once(" requests in ") {
            if rest.contains("read") {
                load.requests = n.trim().parse().ok()?;
            }
        }
    }
    seen_rps.then_some(load)
}

/// wrk's sizes: `812.34KB`, `1.20GB` (powers of 1024).
fn parse_size(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let mult = match unit {
        "" | "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n.parse::<f64>().ok()? * mult)
}
