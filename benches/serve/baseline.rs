//! The reference's "naive hyper from memory" as a control: hyper's own HTTP/1 server on a
//! tokio runtime with a worker per core, answering every request with one file's bytes.
//! It runs in this process (which is idle while wrk runs) in two forms: with only the
//! headers hyper adds, as the reference measured it, and with the head binplz sends for
//! the same file. The two tell what a head of that size costs on this machine apart from
//! how binplz serves it.

use std::convert::Infallible;
use std::net::{Ipv4Addr, TcpListener};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;

use super::BenchResult;

/// Header fields hyper writes itself, or that belong to one connection.
const OWN: [&str; 4] = ["content-length", "date", "connection", "transfer-encoding"];

/// A running control server; stops when dropped.
pub struct Baseline {
    pub name: &'static str,
    pub port: u16,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Serves `body` for every request, with `head` (name, value pairs as another server sent
/// them; the fields hyper writes itself are left out) plus hyper's `content-length` and
/// `date`.
pub fn start(name: &'static str, body: Bytes, head: &[(String, String)]) -> BenchResult<Baseline> {
    let mut headers = HeaderMap::new();
    for (n, v) in head {
        if OWN.iter().any(|o| n.eq_ignore_ascii_case(o)) {
            continue;
        }
        headers.append(
            HeaderName::from_bytes(n.as_bytes())?,
            HeaderValue::from_str(v)?,
        );
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (body, headers) = (body.clone(), headers.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let mut resp = Response::new(Full::new(body.clone()));
                    *resp.headers_mut() = headers.clone();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Baseline {
        name,
        port,
        runtime: Some(runtime),
    })
}
