//! `binplz serve` in-process for tests: the fixture index, a server on `127.0.0.1:0` with
//! a shutdown trigger, an upstream whose requests can be held at a gate, and a raw
//! HTTP/1.1 client that sends request targets byte for byte.
//!
//! ```text
//!  test ─► Client (one connection per request, Connection: close) ─► Server (binplz::server::run
//!          on the test's runtime) ─► Extractor ─► [Gated] ─► HttpUpstream ─► FakeUpstream
//! ```
//!
//! The listener is bound before [`Server::start`] returns, so requests may be sent at once.
//! The fixture index is built once per test binary from `fixtures/eval` against the fixture
//! cache read as `file://`, so building it never counts as a hit on a [`FakeUpstream`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use binplz::cache::disk::DiskCache;
use binplz::cache::files::Files;
use binplz::extract::Extractor;
use binplz::index::build::{self, BuildOptions, EvalInput};
use binplz::index::format::{self, ProgramEntry};
use binplz::index::{EvalFailure, Metadata, NotBuilt};
use binplz::narinfo::Trust;
use binplz::server::{App, Config, IndexSource};
use binplz::upstream::{
    self, BoxFuture, Cache, CachePath, ClientConfig, Deadlines, Fetched, Upstream, UpstreamError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

use super::{cache_dir, fixtures, FakeUpstream, Key};

/// The fixture evaluation indexed against the fixture cache: what `binplz index build`
/// writes, kept as values so tests can vary the revision, creation time and programs.
#[derive(Debug, Clone)]
pub struct FixtureIndex {
    pub meta: Metadata,
    pub programs: Vec<ProgramEntry>,
    pub not_built: Vec<NotBuilt>,
    pub failures: Vec<EvalFailure>,
}

static FIXTURE_INDEX: tokio::sync::OnceCell<FixtureIndex> = tokio::sync::OnceCell::const_new();

/// The fixture index (revision `fixture`), built on first use.
pub async fn fixture_index() -> FixtureIndex {
    FIXTURE_INDEX
        .get_or_init(|| async {
            let url = format!("file://{}", cache_dir("cache").display());
            let cache = upstream::open(&url, &ClientConfig::default())
                .map(Cache::new)
                .expect("the fixture cache opens as a file:// upstream");
            // Like `binplz index build`: programs needing /nix/store are indexed (and refused
            // when served).
            let extractor = Extractor::new(vec![cache], trust(), true);
            let opts = BuildOptions {
                evals: vec![EvalInput::File(fixtures().join("eval/nix-eval-jobs.jsonl"))],
                revision: Some("fixture".into()),
                jobs: 8,
                progress: false,
            };
            let built = build::build(extractor, vec![url], opts)
                .await
                .expect("indexing the fixture evaluation");
            FixtureIndex {
                meta: built.meta,
                programs: built.programs,
                not_built: built.not_built,
                failures: built.failures,
            }
        })
        .await
        .clone()
}

impl FixtureIndex {
    /// The same index claiming another revision and creation time (the newest loaded
    /// index answers requests without `?rev=`).
    pub fn revision(mut self, revision: &str, created: u64) -> FixtureIndex {
        self.meta.revision = Some(revision.to_owned());
        self.meta.created = created;
        self
    }

    /// Adds `alias`, provided exactly as `program` is.
    pub fn with_alias(mut self, alias: &str, program: &str) -> FixtureIndex {
        let mut entry = self
            .programs
            .iter()
            .find(|p| p.program == program)
            .unwrap_or_else(|| panic!("{program} is not in the fixture index"))
            .clone();
        entry.program = alias.to_owned();
        self.programs.push(entry);
        self.meta.programs += 1;
        self
    }

    /// Removes `program`.
    pub fn without(mut self, program: &str) -> FixtureIndex {
        self.programs.retain(|p| p.program != program);
        self.meta.programs = self.programs.len() as u64;
        self
    }

    /// Writes the index file (atomically, as `binplz index build` does).
    pub fn write(&self, path: &Path) {
        format::write(
            path,
            &self.meta,
            &self.programs,
            &self.not_built,
            &self.failures,
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// The index held in memory.
    pub fn source(&self) -> IndexSource {
        let index = format::to_index(&self.meta, &self.programs, &self.not_built, &self.failures)
            .expect("encoding the fixture index");
        IndexSource::Memory(Box::new(index))
    }
}

/// Trusts the fixtures' key only.
pub fn trust() -> Trust {
    Trust::new(&[Key::test().public()], true).expect("the test key parses")
}

/// Short backoff and one retry, so failure tests stay fast; timeouts long enough never to
/// fire on a loaded machine unless a test stalls the upstream on purpose.
pub fn client_config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(5),
        first_byte_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        retries: 1,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    }
}

/// The transport to a fake upstream, as the server opens it.
pub fn http_upstream(up: &FakeUpstream, config: &ClientConfig) -> Arc<dyn Upstream> {
    upstream::open(&up.url(), config).expect("the fake upstream's URL opens")
}

/// Everything a server is started with.
pub struct Setup {
    pub config: Config,
    pub upstreams: Vec<Arc<dyn Upstream>>,
    /// Applied to every upstream.
    pub deadlines: Deadlines,
    pub indexes: Vec<IndexSource>,
    pub cache_dir: PathBuf,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    /// Serving threads: 1 runs `run` on the test's runtime; more run `run_threads`.
    pub threads: usize,
    /// Where files are extracted while the disk cache cannot write (default: `$TMPDIR`).
    pub spill_dir: Option<PathBuf>,
}

impl Setup {
    /// One fake upstream (through [`client_config`]), the given indexes, and a disk cache
    /// in `cache_dir`.
    pub fn new(up: &FakeUpstream, indexes: Vec<IndexSource>, cache_dir: &Path) -> Setup {
        Setup {
            config: Config::default(),
            upstreams: vec![http_upstream(up, &client_config())],
            deadlines: Deadlines::default(),
            indexes,
            cache_dir: cache_dir.to_owned(),
            disk_bytes: 64 << 20,
            memory_bytes: 16 << 20,
            threads: 1,
            spill_dir: None,
        }
    }

    /// [`Setup::new`] with the fixture index alone.
    pub async fn fixture(up: &FakeUpstream, cache_dir: &Path) -> Setup {
        Setup::new(up, vec![fixture_index().await.source()], cache_dir)
    }

    pub fn config(mut self, config: Config) -> Setup {
        self.config = config;
        self
    }

    pub fn upstream(mut self, upstream: Arc<dyn Upstream>) -> Setup {
        self.upstreams = vec![upstream];
        self
    }
}

/// A running server. Dropping it without [`Server::stop`] leaves the server task to the
/// test's runtime, which ends with the test.
pub struct Server {
    pub app: App,
    pub client: Client,
    trigger: Option<oneshot::Sender<()>>,
    stopped_accepting: Option<oneshot::Receiver<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Starts `run` on the current runtime; the port is bound when this returns.
    pub async fn start(setup: Setup) -> Server {
        let extractor = Extractor::new(
            setup
                .upstreams
                .into_iter()
                .map(|u| Cache::with_deadlines(u, setup.deadlines.clone()))
                .collect(),
            trust(),
            false,
        );
        let disk = DiskCache::open(&setup.cache_dir, setup.disk_bytes).unwrap_or_else(|e| {
            panic!(
                "opening the disk cache in {}: {e}",
                setup.cache_dir.display()
            )
        });
        let mut files = Files::new(disk, setup.memory_bytes);
        if let Some(dir) = setup.spill_dir {
            files = files.with_spill_dir(dir);
        }
        let app = App::new(setup.config, setup.indexes, extractor, files)
            .expect("the server's indexes load");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("the listener's address");
        let (trigger, triggered) = oneshot::channel::<()>();
        let (seen_tx, seen_rx) = oneshot::channel();
        let shutdown = async move {
            let _ = triggered.await;
            // `run` drops its listener in the same poll that sees this future resolve, so
            // on a current-thread runtime nothing else runs before the port is closed.
            let _ = seen_tx.send(());
        };
        let task = if setup.threads > 1 {
            tokio::spawn(binplz::server::run_threads(
                listener,
                app.clone(),
                setup.threads,
                shutdown,
            ))
        } else {
            tokio::spawn(binplz::server::run(listener, app.clone(), shutdown))
        };
        Server {
            app,
            client: Client { addr },
            trigger: Some(trigger),
            stopped_accepting: Some(seen_rx),
            task: Some(task),
        }
    }

    pub async fn get(&self, target: &str) -> Reply {
        self.client.get(target).await
    }

    pub async fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
        self.client.request(method, target, headers).await
    }

    /// Tells the server to stop and waits until it no longer accepts connections (see
    /// the note in [`Server::start`] about current-thread runtimes).
    pub async fn begin_shutdown(&mut self) {
        if let Some(t) = self.trigger.take() {
            let _ = t.send(());
        }
        if let Some(rx) = self.stopped_accepting.take() {
            rx.await.expect("the server saw the shutdown");
        }
    }

    /// Stops the server and waits for `run` to return (after responses in progress).
    pub async fn stop(mut self) {
        self.begin_shutdown().await;
        self.wait().await;
    }

    /// Waits for `run` to return after [`Server::begin_shutdown`].
    pub async fn wait(&mut self) {
        if let Some(task) = self.task.take() {
            task.await
                .expect("the server task did not panic")
                .expect("run returned Ok");
        }
    }
}

/// A response as read off the wire.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lower-cased names, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A minimal HTTP/1.1 client: one connection per request, `Connection: close`, the
/// target sent exactly as given (so tests can send what a URL library would refuse).
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub addr: std::net::SocketAddr,
}

impl Client {
    pub async fn get(&self, target: &str) -> Reply {
        self.request("GET", target, &[]).await
    }

    pub async fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
        self.try_request(method, target, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// The request, or the I/O error that prevented it (connection refused, say).
    pub async fn try_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Reply> {
        self.send(method, target, headers).await?.reply().await
    }

    /// Connects and writes the request; the reply is read later, so a test can have many
    /// requests on the wire at once.
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Pending> {
        self.send_body(method, target, headers, b"").await
    }

    /// A request with a body (and its Content-Length), its reply not read yet.
    pub async fn send_body(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Pending> {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        Ok(Pending {
            stream,
            head_request: method == "HEAD",
        })
    }
}

/// A request written to its connection, its reply not read yet.
#[derive(Debug)]
pub struct Pending {
    stream: tokio::net::TcpStream,
    head_request: bool,
}

impl Pending {
    pub async fn reply(mut self) -> std::io::Result<Reply> {
        let mut raw = Vec::new();
        self.stream.read_to_end(&mut raw).await?;
        Ok(parse_reply(&raw, self.head_request))
    }
}

fn parse_reply(raw: &[u8], head_request: bool) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "an incomplete response head: {:?}",
                String::from_utf8_lossy(raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let reply = Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    assert!(
        reply.header("transfer-encoding").is_none(),
        "unexpected chunked response: {head}"
    );
    if let (Some(len), false) = (reply.header("content-length"), head_request) {
        assert_eq!(
            len.parse::<usize>().ok(),
            Some(reply.body.len()),
            "Content-Length disagrees with the body"
        );
    }
    reply
}

/// Holds requests for one cache path until opened; counts those that arrived.
#[derive(Debug, Clone)]
pub struct Gate {
    /// (requests that arrived, open)
    state: Arc<watch::Sender<(usize, bool)>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            state: Arc::new(watch::channel((0, false)).0),
        }
    }
}

impl Gate {
    /// Waits until at least `n` requests have arrived at the gate.
    pub async fn arrivals(&self, n: usize) {
        let mut rx = self.state.subscribe();
        rx.wait_for(|(arrived, _)| *arrived >= n)
            .await
            .expect("the gate is alive");
    }

    pub fn arrived(&self) -> usize {
        self.state.borrow().0
    }

    /// Lets every held request (and every later one) through.
    pub fn open(&self) {
        self.state.send_modify(|s| s.1 = true);
    }

    async fn pass(&self) {
        let mut rx = self.state.subscribe();
        self.state.send_modify(|s| s.0 += 1);
        let _ = rx.wait_for(|(_, open)| *open).await;
    }
}

/// An upstream that holds requests for one path at a [`Gate`], then asks `inner`.
#[derive(Debug)]
pub struct Gated {
    inner: Arc<dyn Upstream>,
    path: String,
    gate: Gate,
}

impl Gated {
    pub fn wrap(inner: Arc<dyn Upstream>, path: &str, gate: &Gate) -> Arc<dyn Upstream> {
        Arc::new(Gated {
            inner,
            path: path.trim_start_matches('/').to_owned(),
            gate: gate.clone(),
        })
    }
}

impl Upstream for Gated {
    fn url(&self) -> &str {
        self.inner.url()
    }

    fn get<'a>(
        &'a self,
        path: &'a CachePath,
    ) -> BoxFuture<'a, Result<Option<Fetched>, UpstreamError>> {
        Box::pin(async move {
            if path.path() == self.path {
                self.gate.pass().await;
            }
            self.inner.get(path).await
        })
    }
}
