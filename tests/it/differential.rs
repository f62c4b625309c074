//! binplz's own HTTP/1 path against hyper's: the same request, sent to a server whose
//! connections start on binplz's path and to one whose connections are all hyper's
//! (`Config::hyper_only`), gets the same answer: status, headers (but `Date`), body,
//! framing (`Content-Length` against the bytes that follow, no chunking), and whether the
//! connection stays open for the next request. A table of requests, then generated ones.
//!
//! Each request is followed on its connection by a last one, `GET /-/healthz` with
//! `Connection: close`, which is answered only if the connection was kept open.

use std::time::Duration;

use proptest::prelude::*;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::server::{Server, Setup};
use crate::support::{self, prebuilt, FakeUpstream};
use binplz::server::Config;

/// The request that follows each one on its connection.
const LAST: &[u8] = b"GET /-/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// A response as compared: what must agree between the two paths.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status_line: String,
    /// Lower-cased names, sorted; `Date` left out, and `Connection: close` in HTTP/1.0.
    headers: Vec<(String, String)>,
    /// The body as text, or its length and SHA-256 (for a short message when they differ).
    body: String,
    /// Whether [`LAST`] was answered after it.
    kept_open: bool,
}

/// Two servers on one fake upstream: one on each path.
struct Both {
    h1: Server,
    hyper: Server,
    _dirs: (TempDir, TempDir),
    _up: FakeUpstream,
}

impl Both {
    async fn start() -> Both {
        let up = FakeUpstream::serve(support::cache_dir("cache"));
        let dirs = (
            tempfile::tempdir().expect("a temp dir"),
            tempfile::tempdir().expect("a temp dir"),
        );
        let start = |dir: &TempDir, hyper_only| {
            let (up, dir) = (&up, dir.path().to_owned());
            async move {
                let setup = Setup::fixture(up, &dir).await.config(Config {
                    hyper_only,
                    ..Config::default()
                });
                Server::start(setup).await
            }
        };
        let h1 = start(&dirs.0, false).await;
        let hyper = start(&dirs.1, true).await;
        // Both hold the same files in memory, so `X-Binplz-Cache` agrees.
        for server in [&h1, &hyper] {
            for program in ["hello", "goodbye"] {
                let r = server.get(&format!("/{program}")).await;
                assert!(r.status == 200 && r.body == prebuilt(program));
            }
        }
        Both {
            h1,
            hyper,
            _dirs: dirs,
            _up: up,
        }
    }

    /// Sends `request` to both and checks that they answer alike.
    async fn agree(&self, request: &[u8]) {
        let head_request = request.starts_with(b"HEAD ");
        let h1 = answer(&self.h1, request, head_request).await;
        let hyper = answer(&self.hyper, request, head_request).await;
        assert_eq!(
            h1,
            hyper,
            "binplz's path (left) and hyper's (right) differ on {:?}",
            String::from_utf8_lossy(request)
        );
    }
}

/// Sends `request` then [`LAST`] on a new connection, and takes the answer apart.
async fn answer(server: &Server, request: &[u8], head_request: bool) -> Answer {
    let mut conn = tokio::net::TcpStream::connect(server.client.addr)
        .await
        .expect("connecting");
    conn.write_all(&[request, LAST].concat())
        .await
        .expect("sending");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut raw))
        .await
        .expect("the server closed the connection")
        .expect("reading");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&raw)))
        + 4;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let mut headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .filter(|(n, _)| n != "date")
        .collect();
    headers.sort();
    let http_1_0_close = status_line.starts_with("HTTP/1.0 ")
        && headers.contains(&("connection".to_owned(), "close".to_owned()));
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("transfer-encoding"), None, "{head}");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status in {head:?}"));
    let len = if head_request || status == 304 || status == 204 {
        0
    } else {
        header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no Content-Length: {head}"))
    };
    assert!(
        raw.len() >= end + len,
        "the body is short of its length: {head}"
    );
    let body = &raw[end..end + len];
    let body = match std::str::from_utf8(body) {
        Ok(text) if text.len() < 4096 => text.to_owned(),
        _ => format!(
            "{} bytes, SHA-256 {}",
            body.len(),
            binplz::hash::hex(&support::sha256(body))
        ),
    };
    let rest = &raw[end + len..];
    let kept_open = !rest.is_empty();
    if kept_open {
        assert!(
            rest.starts_with(b"HTTP/1.1 200 OK\r\n") && rest.ends_with(b"\r\n\r\nok\n"),
            "after {head}: not just the last request's answer: {:?}",
            String::from_utf8_lossy(rest)
        );
    }
    if header("connection") == Some("close") {
        assert!(!kept_open, "answered after `Connection: close`: {head}");
    }
    // Closing is HTTP/1.0's default: binplz's path says so, hyper does not; `kept_open`
    // compares what they do.
    if http_1_0_close {
        headers.retain(|(n, _)| n != "connection");
    }
    Answer {
        status_line,
        headers,
        body,
        kept_open,
    }
}

/// A request head (without its final blank line's terminator beyond `\r\n\r\n`).
fn request(method: &str, target: &str, version: &str, headers: &[(&str, String)]) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/{version}\r\nHost: x\r\n");
    for (n, v) in headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn etag() -> String {
    format!(
        "\"{}\"",
        binplz::hash::hex(&support::sha256(&prebuilt("hello")))
    )
}

#[test]
fn both_paths_answer_the_table_of_requests_alike() {
    let rt = runtime();
    let both = rt.block_on(Both::start());
    let none: &[(&str, String)] = &[];
    let range = |r: &str| vec![("Range", r.to_owned())];
    let cases: Vec<Vec<u8>> = vec![
        request("GET", "/hello", "1.1", none),
        request("HEAD", "/hello", "1.1", none),
        request("GET", "/hello.sha256", "1.1", none),
        request("GET", "/x86_64/hello?rev=fixture", "1.1", none),
        request("GET", "/", "1.1", none),
        request("GET", "/", "1.1", &[("Accept", "text/html".into())]),
        request("GET", "/-/healthz", "1.1", none),
        request("GET", "/-/readyz", "1.1", none),
        request("GET", "/-/search?q=hel", "1.1", none),
        request("HEAD", "/-/search?q=hel", "1.1", none),
        request("GET", "/-/nope", "1.1", none),
        request("HEAD", "/-/nope", "1.1", none),
        request("GET", "/nosuchprogram", "1.1", none),
        request("GET", "/x;reboot", "1.1", none),
        request("GET", "/a`b<c>", "1.1", none),
        request("GET", "/h\u{e9}llo", "1.1", none),
        request("GET", "/hello/extra/parts", "1.1", none),
        request("GET", "/hello", "1.1", &range("bytes=1-4")),
        request("HEAD", "/hello", "1.1", &range("bytes=1-4")),
        request("GET", "/hello", "1.1", &range("bytes=99999999-")),
        request("HEAD", "/hello", "1.1", &range("bytes=99999999-")),
        request("GET", "/hello", "1.1", &range("bytes=-0")),
        request("GET", "/hello", "1.1", &range("items=0-1")),
        request("GET", "/hello", "1.1", &[("If-None-Match", etag())]),
        request("GET", "/hello", "1.0", none),
        request(
            "GET",
            "/hello",
            "1.0",
            &[("Connection", "keep-alive".into())],
        ),
        request(
            "GET",
            "/-/nope",
            "1.0",
            &[("Connection", "keep-alive".into())],
        ),
        request("GET", "/hello", "1.1", &[("Connection", "close".into())]),
        request("DELETE", "/hello", "1.1", none),
    ];
    rt.block_on(async {
        for case in &cases {
            both.agree(case).await;
        }
    });
}

/// A request as generated: method, target, version and a few headers that change answers.
fn generated() -> impl Strategy<Value = Vec<u8>> {
    let target = prop_oneof![
        prop::sample::select(vec![
            "/",
            "/hello",
            "/goodbye",
            "/hello.sha256",
            "/hello?rev=fixture",
            "/hello?rev=nope",
            "/aarch64/hello",
            "/-/healthz",
            "/-/search?q=o",
            "/-/nothing",
        ])
        .prop_map(str::to_owned),
        "/[a-z0-9._;$()'`<>%\u{e9}-]{0,12}",
    ];
    let range = prop_oneof![
        Just(None),
        (0u64..20_000, 0u64..20_000).prop_map(|(a, b)| Some(format!("bytes={a}-{b}"))),
        (0u64..20_000).prop_map(|a| Some(format!("bytes={a}-"))),
        (0u64..20_000).prop_map(|n| Some(format!("bytes=-{n}"))),
    ];
    let if_none_match = prop_oneof![Just(None), Just(Some(etag())), Just(Some("\"x\"".into()))];
    let connection = prop::sample::select(vec![None, Some("close"), Some("keep-alive")]);
    (
        prop::sample::select(vec!["GET", "HEAD"]),
        target,
        prop::sample::select(vec!["1.0", "1.1"]),
        range,
        if_none_match,
        connection,
    )
        .prop_map(|(method, target, version, range, inm, connection)| {
            let mut headers = Vec::new();
            if let Some(r) = range {
                headers.push(("Range", r));
            }
            if let Some(e) = inm {
                headers.push(("If-None-Match", e));
            }
            if let Some(c) = connection {
                headers.push(("Connection", c.to_owned()));
            }
            request(method, &target, version, &headers)
        })
}

#[test]
fn both_paths_answer_generated_requests_alike() {
    let rt = runtime();
    let both = rt.block_on(Both::start());
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(req in generated())| {
        rt.block_on(both.agree(&req));
    });
}
