//! The command line: flags parsed once into typed values, errors turned into one line and
//! an exit status (see [`ErrorKind::exit_code`]).

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::ErrorKind;
use crate::extract::{self, ExtractError, Extracted, Extractor};
use crate::index::build::{self, BuildOptions};
use crate::index::{format, Index, Lookup};
use crate::narinfo::{Trust, CACHE_NIXOS_ORG_KEY};
use crate::resolve::RelPath;
use crate::upstream::{self, Cache, ClientConfig, Deadlines};

/// Serve any program in a Nix binary cache as a verified, curl-able binary.
#[derive(Debug, Parser)]
#[command(name = "binplz", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch, verify and extract one file from a store path (or from a local NAR).
    ///
    /// binplz extract [--upstream URL]... STORE_PATH PATH [-o FILE]
    /// binplz extract --nar FILE [--nar-hash sha256:...] PATH [-o FILE]
    Extract(ExtractArgs),
    /// Build and query program indexes.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Measure NAR extraction on NAR files, a cache's NARs or generated ones.
    ///
    /// binplz bench [--nar FILE]... [--cache URL [--sample N]] [--generate 100M,...]
    /// [--codecs zstd:3,zstd:19,xz:6,none] [--runs N] [--json] [--compare-nix]
    Bench(crate::bench::command::BenchArgs),
    /// Serve programs over HTTP: `curl -fsSL http://HOST/tree -o tree`.
    ///
    /// With no --upstream and no --index, serves a built-in demo (offline).
    Serve(ServeArgs),
    /// Upload a staging cache (written by `nix copy --to file://DIR`) to a store, each
    /// narinfo last.
    Publish(crate::store::command::PublishArgs),
    /// Delete what no loaded index needs from a store (a dry run unless --delete).
    Gc(crate::store::command::GcArgs),
    /// Build on demand what the indexes name but no cache has (the only command that runs
    /// Nix): a queue with budgets, failure memory, logs and an operator page.
    Builder(crate::builder::cli::BuilderArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        value_name = "ADDR",
        env = "BINPLZ_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: std::net::SocketAddr,

    #[command(flatten)]
    upstream: UpstreamArgs,

    /// An index built by `binplz index build`. May repeat (one per Nixpkgs revision).
    #[arg(
        long = "index",
        value_name = "PATH",
        env = "BINPLZ_INDEX",
        value_delimiter = ' '
    )]
    indexes: Vec<PathBuf>,

    #[command(flatten)]
    index_limit: IndexLimitArgs,

    #[command(flatten)]
    substituter: crate::server::substituter::SubstituterArgs,

    #[command(flatten)]
    builder: Box<crate::server::building::BuilderArgs>,

    /// Directory of the disk cache [default: $XDG_CACHE_HOME/binplz or ~/.cache/binplz].
    #[arg(long, value_name = "DIR", env = "BINPLZ_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Disk cache size (bytes; K, M, G and T suffixes are powers of 1024).
    #[arg(long, value_name = "BYTES", env = "BINPLZ_DISK_CACHE_SIZE", default_value = "10G", value_parser = parse_bytes)]
    disk_cache_size: u64,

    /// Memory cache size.
    #[arg(long, value_name = "BYTES", env = "BINPLZ_MEMORY_CACHE_SIZE", default_value = "256M", value_parser = parse_bytes)]
    memory_cache_size: u64,

    /// Largest file served.
    #[arg(long, value_name = "BYTES", env = "BINPLZ_MAX_FILE_SIZE", default_value = "1G", value_parser = parse_bytes)]
    max_file_size: u64,

    /// System for requests that name none.
    #[arg(
        long,
        value_name = "SYSTEM",
        env = "BINPLZ_DEFAULT_SYSTEM",
        default_value = "x86_64-linux"
    )]
    default_system: String,

    /// Upstream extractions at once.
    #[arg(
        long,
        value_name = "N",
        env = "BINPLZ_MAX_UPSTREAM_FETCHES",
        default_value_t = 16
    )]
    max_upstream_fetches: usize,

    /// Longest a request waits for one of the --max-upstream-fetches slots before it is
    /// answered 503 with Retry-After (e.g. 10s, 500ms).
    #[arg(long, value_name = "DURATION", env = "BINPLZ_UPSTREAM_QUEUE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    upstream_queue_timeout: Duration,

    /// Requests in progress per client address.
    #[arg(
        long,
        value_name = "N",
        env = "BINPLZ_MAX_PER_CLIENT",
        default_value_t = 32
    )]
    max_per_client: usize,

    /// Seconds to finish responses in progress after SIGTERM or SIGINT.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "BINPLZ_SHUTDOWN_GRACE",
        default_value_t = 30
    )]
    shutdown_grace: u64,

    /// Threads serving connections, each with its own event loop [default: the number of
    /// CPUs].
    #[arg(long, value_name = "N", env = "BINPLZ_THREADS")]
    threads: Option<usize>,

    /// Seconds the disk cache's scrubber takes to re-hash every file once, dropping those
    /// whose content changed (bit rot); at most 32 MiB/s whatever this says. 0: no scrubber.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "BINPLZ_DISK_SCRUB_PERIOD",
        default_value_t = crate::cache::scrub::DEFAULT_PERIOD.as_secs()
    )]
    disk_scrub_period: u64,

    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", env = "BINPLZ_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// How much of an index file may be read.
#[derive(Debug, Args)]
pub(crate) struct IndexLimitArgs {
    /// Largest index file read; anything larger (or not a regular file) is refused, and a
    /// server keeps serving the index it has. The file is held in memory whole.
    #[arg(long, value_name = "BYTES", env = "BINPLZ_MAX_INDEX_SIZE", default_value = "1G", value_parser = parse_bytes)]
    max_index_size: u64,
}

impl IndexLimitArgs {
    /// The limit, validated: zero would refuse every index.
    pub(crate) fn bytes(&self) -> Result<u64, CliError> {
        if self.max_index_size == 0 {
            return Err(bad("--max-index-size must be more than 0".into()));
        }
        Ok(self.max_index_size)
    }
}

/// Parses `1048576`, `512K`, `256M`, `10G` (powers of 1024).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: expected bytes, or a number with K, M, G or T"))
}

/// Which narinfo signatures count (shared by every command that reads a cache).
#[derive(Debug, Args)]
pub(crate) struct TrustArgs {
    /// Public key whose signatures are trusted (NAME:BASE64). May repeat.
    /// Default: cache.nixos.org's key.
    #[arg(
        long = "trusted-public-key",
        value_name = "NAME:BASE64",
        env = "BINPLZ_TRUSTED_PUBLIC_KEY",
        value_delimiter = ' '
    )]
    trusted_public_keys: Vec<String>,

    /// Accept narinfos without a valid trusted signature (NarHash is still checked).
    #[arg(long, env = "BINPLZ_NO_REQUIRE_SIGS")]
    no_require_sigs: bool,
}

impl TrustArgs {
    /// The keys given, or cache.nixos.org's; an error says which key is malformed.
    pub(crate) fn trust(&self) -> Result<Trust, String> {
        let keys = if self.trusted_public_keys.is_empty() {
            vec![CACHE_NIXOS_ORG_KEY.to_owned()]
        } else {
            self.trusted_public_keys.clone()
        };
        Trust::new(&keys, !self.no_require_sigs).map_err(|e| e.to_string())
    }
}

/// Where store paths come from and which signatures count.
#[derive(Debug, Args)]
struct UpstreamArgs {
    /// Binary cache to fetch from: http://, https://, file:///path or
    /// s3://BUCKET?region=…&endpoint=…&scheme=…&profile=…. May repeat; tried in
    /// order. Default: https://cache.nixos.org (for `serve`: the built-in demo).
    #[arg(
        long = "upstream",
        value_name = "URL",
        env = "BINPLZ_UPSTREAM",
        value_delimiter = ' '
    )]
    upstreams: Vec<String>,

    #[command(flatten)]
    trust: TrustArgs,

    /// Longest a narinfo fetch may take, every retry included (e.g. 10s, 500ms).
    #[arg(long, value_name = "DURATION", env = "BINPLZ_UPSTREAM_NARINFO_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    upstream_narinfo_timeout: Duration,

    /// Least average rate of a NAR download (bytes per second; K, M, G suffixes), over
    /// each --upstream-rate-window of waiting on the upstream.
    #[arg(long, value_name = "BYTES", env = "BINPLZ_UPSTREAM_MIN_RATE", default_value = "32K", value_parser = parse_bytes)]
    upstream_min_rate: u64,

    /// The window over which --upstream-min-rate is averaged.
    #[arg(long, value_name = "DURATION", env = "BINPLZ_UPSTREAM_RATE_WINDOW", default_value = "30s", value_parser = parse_duration)]
    upstream_rate_window: Duration,

    /// Longest a NAR download may take, retries included, besides its NarSize at
    /// --upstream-min-rate.
    #[arg(long, value_name = "DURATION", env = "BINPLZ_UPSTREAM_NAR_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    upstream_nar_timeout: Duration,
}

/// Parses `500ms`, `10s`, `2m` or a number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n = digits.parse::<u64>().ok();
    let d = match (n, unit.trim()) {
        (Some(n), "ms") => Some(Duration::from_millis(n)),
        (Some(n), "s") => Some(Duration::from_secs(n)),
        (Some(n), "m") => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    };
    d.ok_or_else(|| format!("invalid duration {s:?}: expected a number with ms, s or m"))
}

#[derive(Debug, Args)]
struct ExtractArgs {
    #[command(flatten)]
    upstream: UpstreamArgs,

    /// Extract even a file that needs /nix/store at run time.
    #[arg(long)]
    allow_nix_store_deps: bool,

    /// Read this local NAR (compressed or not) instead of fetching a store path.
    #[arg(long, value_name = "FILE")]
    nar: Option<PathBuf>,

    /// With --nar: the NAR's expected hash (sha256:… in any of Nix's spellings).
    #[arg(long, value_name = "HASH", requires = "nar")]
    nar_hash: Option<String>,

    /// Write the file here (mode 0755 when executable) instead of to standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// STORE_PATH PATH, or just PATH with --nar.
    #[arg(value_name = "STORE_PATH PATH", num_args = 1..=2, required = true)]
    args: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum IndexCommand {
    /// Build an index from evaluations (nix-eval-jobs JSON lines or nix-env JSON) and the cache.
    Build(IndexBuildArgs),
    /// Show which store path and file provide a program.
    Show(IndexShowArgs),
    /// Print an index's metadata and counts.
    Stats {
        /// The index file.
        index: PathBuf,
        #[command(flatten)]
        limit: IndexLimitArgs,
    },
}

#[derive(Debug, Args)]
struct IndexBuildArgs {
    /// An evaluation: `nix-eval-jobs` output or `nix-env -qaP --out-path --json`. May repeat
    /// (one per system).
    #[arg(long = "eval", value_name = "FILE", required = true)]
    evals: Vec<PathBuf>,

    #[command(flatten)]
    upstream: UpstreamArgs,

    /// The Nixpkgs revision the evaluation came from.
    #[arg(long, value_name = "REV")]
    revision: Option<String>,

    /// Store paths scanned at once.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    jobs: u16,

    /// Where to write the index (atomically).
    #[arg(short, long, value_name = "INDEX")]
    output: PathBuf,
}

#[derive(Debug, Args)]
struct IndexShowArgs {
    /// The index file.
    index: PathBuf,
    /// The program's name.
    program: String,
    /// Only from this attribute.
    #[arg(long)]
    attr: Option<String>,
    /// The system (default: the index's only system, or x86_64-linux).
    #[arg(long)]
    system: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    limit: IndexLimitArgs,
}

/// Runs the command line and returns the process's exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Serve(a) if a.log_format == "json");
    let log = init_tracing(json);
    let result = match cli.command {
        Command::Extract(args) => run_extract(args),
        Command::Index(IndexCommand::Build(args)) => run_index_build(args),
        Command::Index(IndexCommand::Show(args)) => run_index_show(args),
        Command::Index(IndexCommand::Stats { index, limit }) => run_index_stats(&index, &limit),
        Command::Serve(args) => run_serve(args),
        Command::Publish(args) => crate::store::command::run_publish(args),
        Command::Gc(args) => crate::store::command::run_gc(args),
        Command::Bench(args) => crate::bench::command::run_bench(args),
        Command::Builder(args) => crate::builder::cli::run_builder(args),
    };
    log.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((kind, msg)) => {
            eprintln!("binplz: error: {msg}");
            ExitCode::from(kind.exit_code())
        }
    }
}

/// Logs to standard error as text, or with `json` as one JSON object per line (fields at
/// the top level, next to `timestamp`, `level` and `target`).
fn init_tracing(json: bool) -> LogWriter {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BINPLZ_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,binplz::access=info,binplz::server=info,binplz::builder=info",
        )
    });
    let writer = LogWriter::default();
    let flusher = writer.clone();
    // Lines are written to a buffer and flushed ten times a second (and at exit), so a
    // busy server does not make one write(2) per request.
    let _ = std::thread::Builder::new()
        .name("binplz-log".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            flusher.flush();
        });
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
    let _ = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
            .try_init()
    };
    writer
}

/// A buffered, shared standard error for log lines.
#[derive(Clone)]
struct LogWriter(std::sync::Arc<std::sync::Mutex<io::BufWriter<io::Stderr>>>);

impl Default for LogWriter {
    fn default() -> Self {
        LogWriter(std::sync::Arc::new(std::sync::Mutex::new(
            io::BufWriter::with_capacity(64 << 10, io::stderr()),
        )))
    }
}

impl LogWriter {
    fn flush(&self) {
        if let Ok(mut w) = self.0.lock() {
            let _ = w.flush();
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.lock() {
            Ok(mut w) => w.write(buf),
            Err(_) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        LogWriter::flush(self);
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

pub(crate) type CliError = (ErrorKind, String);

fn fail(e: ExtractError) -> CliError {
    (e.kind(), e.to_string())
}

pub(crate) fn bad(msg: String) -> CliError {
    (ErrorKind::BadRequest, msg)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| (ErrorKind::Internal, e.to_string()))
}

/// The cache used when none is given (except by `serve`, which then serves its demo).
const DEFAULT_UPSTREAM: &str = "https://cache.nixos.org";

impl UpstreamArgs {
    /// The caches to use: as given, or the default one.
    fn urls(&self) -> Vec<String> {
        if self.upstreams.is_empty() {
            vec![DEFAULT_UPSTREAM.to_owned()]
        } else {
            self.upstreams.clone()
        }
    }

    fn extractor(&self, allow_nix_store_deps: bool) -> Result<Extractor, CliError> {
        let trust = self.trust.trust().map_err(bad)?;
        let config = ClientConfig::default();
        let deadlines = Deadlines::new(
            self.upstream_narinfo_timeout,
            self.upstream_min_rate,
            self.upstream_rate_window,
            self.upstream_nar_timeout,
        )
        .map_err(|e| bad(e.to_string()))?;
        let caches = self
            .urls()
            .iter()
            .map(|u| {
                upstream::open(u, &config).map(|u| Cache::with_deadlines(u, deadlines.clone()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Extractor::new(caches, trust, allow_nix_store_deps))
    }
}

fn run_extract(args: ExtractArgs) -> Result<(), CliError> {
    let tmp_dir = extract::temp_dir_for(args.output.as_deref());
    // Check the destination before downloading anything.
    if let Some(out) = &args.output {
        if out.is_dir() {
            return Err(bad(format!("-o {}: is a directory", out.display())));
        }
        if !tmp_dir.is_dir() {
            return Err(bad(format!(
                "-o {}: no directory {}",
                out.display(),
                tmp_dir.display()
            )));
        }
    }
    let extracted = match &args.nar {
        Some(nar) => {
            let [path] = args.args.as_slice() else {
                return Err(bad("with --nar, give only the PATH inside the NAR".into()));
            };
            let nar_hash = match &args.nar_hash {
                Some(h) => Some(
                    crate::hash::parse_sha256(h)
                        .ok_or_else(|| bad(format!("invalid --nar-hash {h:?}")))?,
                ),
                None => None,
            };
            extract::extract_local(
                nar,
                nar_hash,
                &RelPath::parse(path.as_bytes()),
                &tmp_dir,
                args.allow_nix_store_deps,
            )
            .map_err(fail)?
        }
        None => {
            let [store_path, path] = args.args.as_slice() else {
                return Err(bad(
                    "give a STORE_PATH and a PATH inside it (or use --nar FILE PATH)".into(),
                ));
            };
            let store_path = extract::parse_store_path(store_path).map_err(fail)?;
            let extractor = args.upstream.extractor(args.allow_nix_store_deps)?;
            let path = RelPath::parse(path.as_bytes());
            runtime()?
                .block_on(extractor.extract(&store_path, &path, &tmp_dir))
                .map_err(fail)?
        }
    };
    write_out(extracted, args.output.as_deref()).map_err(|e| (ErrorKind::Internal, e))
}

/// Moves the verified file into place (or copies it to stdout), then reports the verdict.
fn write_out(extracted: Extracted, output: Option<&Path>) -> Result<(), String> {
    let Extracted {
        file,
        size,
        executable,
        linkage,
        path,
        ..
    } = extracted;
    match output {
        Some(out) => {
            let mode = if executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot set permissions: {e}"))?;
            // Renamed into place only now, after verification. Not fsynced, as curl and
            // wget do not: a power cut right after may leave the file empty or short
            // (rerun the command); binplz itself never writes a wrong byte there.
            file.persist(out)
                .map_err(|e| format!("cannot write {}: {}", out.display(), e.error))?;
        }
        None => {
            let mut f = file.reopen().map_err(|e| e.to_string())?;
            let mut stdout = io::stdout().lock();
            io::copy(&mut f, &mut stdout)
                .and_then(|_| stdout.flush())
                .map_err(|e| format!("writing to stdout: {e}"))?;
        }
    }
    eprintln!("binplz: {path}: {linkage}, {size} bytes, verified against its NAR's signed hash");
    Ok(())
}

fn run_index_build(args: IndexBuildArgs) -> Result<(), CliError> {
    let extractor = args.upstream.extractor(true)?;
    let opts = BuildOptions {
        evals: args.evals.into_iter().map(build::EvalInput::File).collect(),
        revision: args.revision,
        jobs: usize::from(args.jobs),
        progress: true,
    };
    let upstreams = args.upstream.urls();
    let built = runtime()?
        .block_on(build::build(extractor, upstreams, opts))
        .map_err(|e| bad(e.to_string()))?;
    for w in &built.warnings {
        eprintln!("binplz: warning: skipped {w}");
    }
    format::write(
        &args.output,
        &built.meta,
        &built.programs,
        &built.not_built,
        &built.failures,
    )
    .map_err(|e| {
        (
            ErrorKind::Internal,
            format!("cannot write {}: {e}", args.output.display()),
        )
    })?;
    let s = &built.summary;
    eprintln!(
        "binplz: indexed {} attributes, {} outputs: {} programs, {} outputs not built, \
         {} outputs failed, {} evaluation errors, {} lines skipped \
         (listings: {} from .ls, {} from NARs, {} .ls rejected; {} bin/ entries skipped, \
         {} left out for a reference that could not be listed)",
        s.attributes,
        s.outputs,
        s.programs,
        s.not_built,
        s.failures,
        s.eval_failures,
        s.bad_lines,
        s.from_listing,
        s.from_nar,
        s.listings_rejected,
        s.skipped_links,
        s.failed_links,
    );
    eprintln!("binplz: wrote {}", args.output.display());
    Ok(())
}

fn load(path: &Path, limit: &IndexLimitArgs) -> Result<Index, CliError> {
    Index::load(path, limit.bytes()?).map_err(|e| bad(e.to_string()))
}

fn run_index_show(args: IndexShowArgs) -> Result<(), CliError> {
    let index = load(&args.index, &args.limit)?;
    let system = match (&args.system, index.metadata().systems.as_slice()) {
        (Some(s), _) => s.clone(),
        (None, [only]) => only.clone(),
        (None, _) => "x86_64-linux".to_owned(),
    };
    match index.resolve(&system, &args.program, args.attr.as_deref()) {
        Lookup::Found(found) => {
            let chosen = found.chosen();
            let all: Vec<_> = found.iter().collect();
            if args.json {
                let candidates: Vec<serde_json::Value> = all
                    .iter()
                    .map(|c| serde_json::json!({"attr": c.attr, "store_path": c.store_path, "path": c.path, "drv_path": c.drv_path}))
                    .collect();
                let v = serde_json::json!({
                    "program": args.program,
                    "system": system,
                    "attr": chosen.attr,
                    "output": chosen.output,
                    "store_path": chosen.store_path,
                    "path": chosen.path,
                    "drv_path": chosen.drv_path,
                    "built": true,
                    "candidates": candidates,
                });
                println!("{v}");
            } else {
                println!("{} ({system})", args.program);
                for (i, c) in all.iter().enumerate() {
                    let mark = if i == 0 { "*" } else { " " };
                    println!(
                        "{mark} {}.{}  {}/{}  ({} bytes)",
                        c.attr, c.output, c.store_path, c.path, c.size
                    );
                }
            }
            Ok(())
        }
        Lookup::NotBuilt {
            attr,
            store_path,
            drv_path,
        } => {
            if args.json {
                let v = serde_json::json!({
                    "program": args.program,
                    "system": system,
                    "attr": attr,
                    "store_path": store_path,
                    "drv_path": drv_path,
                    "built": false,
                });
                // Not an error here: a script asking for JSON reads `built`.
                println!("{v}");
                return Ok(());
            }
            Err((
                ErrorKind::NotBuilt,
                format!(
                    "{} ({system}) is provided by {attr}, whose {store_path} is not built yet",
                    args.program
                ),
            ))
        }
        Lookup::Unknown => {
            let suggestions = index.suggest(&system, &args.program);
            let hint = if suggestions.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", suggestions.join(", "))
            };
            let from = args
                .attr
                .as_deref()
                .map(|a| format!(" from {a}"))
                .unwrap_or_default();
            Err((
                ErrorKind::UnknownProgram,
                format!("unknown program {}{from} for {system}{hint}", args.program),
            ))
        }
    }
}

fn run_index_stats(path: &Path, limit: &IndexLimitArgs) -> Result<(), CliError> {
    let index = load(path, limit)?;
    let m = index.metadata();
    println!("index:      {}", path.display());
    println!("format:     version {}", format::VERSION);
    println!(
        "revision:   {}",
        m.revision.as_deref().unwrap_or("(unknown)")
    );
    println!("systems:    {}", m.systems.join(", "));
    println!("created:    {} (Unix time)", m.created);
    println!("upstreams:  {}", m.upstreams.join(", "));
    println!("attributes: {}", m.attributes);
    println!("outputs:    {}", m.outputs);
    println!("programs:   {}", m.programs);
    println!("not built:  {}", m.not_built);
    println!("failures:   {}", m.failures);
    Ok(())
}

fn default_cache_dir() -> PathBuf {
    cache_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// `$XDG_CACHE_HOME/binplz`, else `$HOME/.cache/binplz`, else under the temp directory. A
/// relative or empty value is ignored (as the XDG spec says): it would put the cache in
/// whatever directory the server was started from.
fn cache_dir_from(xdg: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> PathBuf {
    let absolute = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg)
        .or_else(|| absolute(home).map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("binplz")
}

fn run_serve(args: ServeArgs) -> Result<(), CliError> {
    use crate::server::{App, Config, IndexSource};
    let demo = args.upstream.upstreams.is_empty() && args.indexes.is_empty();
    if args.upstream.upstreams.is_empty() && !args.indexes.is_empty() {
        return Err(bad(
            "give --upstream with --index (--upstream alone serves a substituter only)".into(),
        ));
    }
    let config = Config {
        default_system: crate::server::routes::System::parse(&args.default_system)
            .ok_or_else(|| bad(format!("unknown system {:?}", args.default_system)))?
            .to_string(),
        max_file_size: args.max_file_size,
        max_upstream_fetches: args.max_upstream_fetches.max(1),
        max_per_client: args.max_per_client.max(1),
        upstream_queue_timeout: args.upstream_queue_timeout,
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace),
        disk_scrub_period: (args.disk_scrub_period > 0)
            .then(|| std::time::Duration::from_secs(args.disk_scrub_period)),
        max_index_size: args.index_limit.bytes()?,
        cache: args.substituter.config().map_err(bad)?,
        builder: args.builder.settings(),
        ..Config::default()
    };
    // This node's signature vouches for a narinfo: it must have checked one first.
    if config.cache.sign_key.is_some() && args.upstream.trust.no_require_sigs {
        return Err(bad(
            "--sign-key-file needs signatures checked: drop --no-require-sigs".into(),
        ));
    }
    let extractor = if demo {
        let trust =
            Trust::new(&[crate::demo::PUBLIC_KEY.trim()], true).map_err(|e| bad(e.to_string()))?;
        let caches = vec![Cache::new(std::sync::Arc::new(crate::demo::DemoUpstream))];
        Extractor::new(caches, trust, false)
    } else {
        args.upstream.extractor(false)?
    };
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cache_dir = if demo {
        cache_dir.join("demo")
    } else {
        cache_dir
    };
    let disk =
        crate::cache::disk::DiskCache::open(&cache_dir, args.disk_cache_size).map_err(|e| {
            (
                ErrorKind::Internal,
                format!(
                    "cannot open the cache directory {}: {e}",
                    cache_dir.display()
                ),
            )
        })?;
    let files = crate::cache::files::Files::new(disk, args.memory_cache_size);
    raise_open_files_limit();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // This thread is the first of the serving threads (see `server::run_threads`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
    let served = rt.block_on(async move {
        let sources = if demo {
            let opts = BuildOptions {
                evals: vec![build::EvalInput::Bytes { name: "demo evaluation".into(), bytes: crate::demo::EVAL }],
                revision: Some("demo".into()),
                jobs: 8,
                progress: false,
            };
            let built = build::build(extractor.clone(), vec![crate::demo::URL.into()], opts)
                .await
                .map_err(|e| (ErrorKind::Internal, format!("building the demo index: {e}")))?;
            let index = crate::index::format::to_index(&built.meta, &built.programs, &built.not_built, &built.failures)
                .map_err(|e| (ErrorKind::Internal, format!("building the demo index: {e}")))?;
            vec![IndexSource::Memory(Box::new(index))]
        } else {
            args.indexes.iter().cloned().map(IndexSource::File).collect()
        };
        let app = App::new(config, sources, extractor, files).map_err(bad)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| (ErrorKind::Internal, format!("cannot listen on {}: {e}", args.listen)))?;
        let addr = listener.local_addr().map_err(|e| (ErrorKind::Internal, e.to_string()))?;
        if demo {
            tracing::info!(target: "binplz::server", "serving the built-in demo; try: curl -fsSL http://{addr}/hello -o hello && chmod +x hello && ./hello");
        }
        tracing::info!(target: "binplz::server", %addr, cache_dir = %cache_dir.display(), "listening");
        let reload = app.clone();
        tokio::spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                reload.reload_indexes(true).await;
            }
        });
        crate::server::run_threads(listener, app, threads, shutdown_signal())
            .await
            .map_err(|e| (ErrorKind::Internal, e.to_string()))
    });
    // Dropping the runtime would wait for every blocking task, however long: an index
    // reload still reading a slow file would keep a stopped server from exiting. What
    // had to finish (responses, files being kept) was waited for within the grace period.
    rt.shutdown_timeout(LEFTOVER_BLOCKING_WAIT);
    served
}

/// How long an exiting server waits for blocking work nobody waits for any more (an
/// index reload in progress): short, as its result would be thrown away.
const LEFTOVER_BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Raises the soft limit on open files to the hard one, as Go programs and nginx's
/// `worker_rlimit_nofile` do: each connection takes a descriptor, and each large file held
/// in memory another (a memory file), while the usual soft limit of 1024 is well under the
/// default connection cap.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(err = %e, "cannot raise the open files limit");
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit_or_as_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "1h", "-1s", "1.5s", "ms", "18446744073709551615m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_cache_dir_ignores_empty_or_relative_variables() {
        let d = |xdg: Option<&str>, home: Option<&str>| {
            cache_dir_from(xdg.map(Into::into), home.map(Into::into))
        };
        let tmp = std::env::temp_dir().join("binplz");
        assert_eq!(d(Some("/x"), Some("/h")), PathBuf::from("/x/binplz"));
        assert_eq!(d(Some(""), Some("/h")), PathBuf::from("/h/.cache/binplz"));
        assert_eq!(d(Some("rel"), None), tmp);
        assert_eq!(d(None, Some("")), tmp);
        assert_eq!(d(None, Some("home")), tmp);
        assert_eq!(d(None, None), tmp);
    }
}
