//! A real S3 server for tests: `s3s-fs` on a free loopback port, over a temporary
//! directory (each bucket is a directory in its root), checking SigV4 signatures made
//! with [`ACCESS_KEY`] and [`SECRET_KEY`].
//!
//! CI installs `s3s-fs` (`.ci/run`); a test that cannot find it fails saying how to install
//! it, never skips.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::aws::{AmazonS3, AmazonS3Builder};

pub const ACCESS_KEY: &str = "binplz-test";
pub const SECRET_KEY: &str = "binplz-test-secret-key";

/// How long `s3s-fs` may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(30);

fn find_s3s_fs() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "s3s-fs not found (on PATH, in $CARGO_HOME/bin or ~/.cargo/bin); install it with \
                 `cargo install s3s-fs --locked --version 0.14.1 --features binary` (.ci/run does)"
            )
        })
}

/// A running `s3s-fs`, stopped when dropped.
pub struct S3Server {
    child: Child,
    root: tempfile::TempDir,
    addr: SocketAddr,
}

impl S3Server {
    pub fn start() -> S3Server {
        let bin = find_s3s_fs();
        let root = tempfile::tempdir().expect("a temp directory for s3s-fs");
        // s3s-fs takes a port, not a listener: ask the kernel for a free one, then let go.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut server = S3Server { child, root, addr };
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("s3s-fs exited before accepting connections: {status}");
            }
            assert!(
                start.elapsed() < START_DEADLINE,
                "s3s-fs did not accept connections within {START_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Creates a bucket (a directory in the server's root).
    pub fn bucket(&self, name: &str) -> PathBuf {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).expect("creating the bucket's directory");
        dir
    }

    /// Where the server keeps `bucket`'s objects.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.path().join(bucket)
    }

    /// The bucket's URL as Nix writes it.
    pub fn url(&self, bucket: &str) -> String {
        format!(
            "s3://{bucket}?region=us-east-1&endpoint={}&scheme=http",
            self.addr
        )
    }

    /// Gives `cmd` the server's credentials through the environment (and no other AWS
    /// setting from the test's own environment).
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        self.env_with(cmd, ACCESS_KEY, SECRET_KEY)
    }

    pub fn env_with<'a>(&self, cmd: &'a mut Command, key: &str, secret: &str) -> &'a mut Command {
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    }

    /// A client for `bucket` with explicit credentials (the test process's environment is
    /// shared by every test, so it is left alone).
    pub fn client(&self, bucket: &str, secret: &str) -> AmazonS3 {
        client_at(self.addr, bucket, secret)
    }
}

fn client_at(addr: SocketAddr, bucket: &str, secret: &str) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(format!("http://{addr}"))
        .with_allow_http(true)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(secret)
        .build()
        .expect("an S3 client for the test server")
}

/// An [`S3Server`] seen through a bucket policy that grants s3:GetObject but not
/// s3:ListBucket, answering as AWS does then: listings are refused, and a missing key is
/// 403 `AccessDenied` rather than 404 `NoSuchKey`. Everything else (signature checks
/// included: the `Host` header goes through unchanged) is the real server's answer.
pub struct NoListProxy {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NoListProxy {
    pub fn start(server: &S3Server) -> NoListProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let addr = listener.local_addr().expect("the listener's address");
        let upstream = server.addr;
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building the proxy's runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("using the listener");
                let client: Client<HttpConnector, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                loop {
                    let stream = tokio::select! {
                        _ = &mut rx => return,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => continue,
                        },
                    };
                    let client = client.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let client = client.clone();
                            async move { Ok::<_, Infallible>(no_list(upstream, &client, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            runtime.shutdown_background();
        });
        NoListProxy {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// A client for `bucket` through the proxy.
    pub fn client(&self, bucket: &str, secret: &str) -> AmazonS3 {
        client_at(self.addr, bucket, secret)
    }
}

impl Drop for NoListProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What AWS answers a request the policy does not allow (HEAD answers carry no body).
fn access_denied(head: bool) -> Response<Full<Bytes>> {
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from_static(
            b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
              <Message>Access Denied</Message></Error>",
        )
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    response
}

async fn no_list(
    upstream: SocketAddr,
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    // Path-style requests: `/BUCKET` alone is a listing, `/BUCKET/KEY` an object.
    let listing = parts.method == Method::GET && !parts.uri.path().trim_matches('/').contains('/');
    if listing {
        return access_denied(head);
    }
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forwarded = Request::new(Full::new(body));
    *forwarded.method_mut() = parts.method.clone();
    *forwarded.uri_mut() = format!("http://{upstream}{path}")
        .parse()
        .expect("a URI to the real server");
    *forwarded.headers_mut() = parts.headers;
    let Ok(response) = client.request(forwarded).await else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        return r;
    };
    let (mut parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if parts.status == StatusCode::NOT_FOUND
        && (head || contains(&bytes, b"<Code>NoSuchKey</Code>"))
    {
        return access_denied(head);
    }
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    Response::from_parts(parts, Full::new(bytes))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `dir`, as (relative path, bytes), sorted.
pub fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .expect("under the root")
                    .to_string_lossy()
                    .into_owned();
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
                out.push((rel, bytes));
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}
