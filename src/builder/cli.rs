//! `binplz builder`'s options (each also from a `BINPLZ_…` variable) and its entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::publish::StoreUri;
use super::{Builder, Config, OperatorToken};
use crate::cli::{bad, parse_bytes, parse_duration, shutdown_signal, CliError, IndexLimitArgs};
use crate::error::ErrorKind;

#[derive(Debug, Args)]
pub struct BuilderArgs {
    /// Address to listen on.
    #[arg(
        long,
        value_name = "ADDR",
        env = "BINPLZ_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    listen: SocketAddr,

    /// An index built by `binplz index build`: only derivations some loaded index names
    /// are built. May repeat; files are reloaded when they change (and on SIGHUP).
    #[arg(
        long = "index",
        value_name = "PATH",
        env = "BINPLZ_INDEX",
        value_delimiter = ' ',
        required = true
    )]
    indexes: Vec<PathBuf>,

    #[command(flatten)]
    index_limit: IndexLimitArgs,

    /// How often index files are checked for changes (e.g. 30s).
    #[arg(long, value_name = "DURATION", env = "BINPLZ_INDEX_POLL", default_value = "30s", value_parser = parse_duration)]
    index_poll: Duration,

    /// Where built outputs are published, narinfo last: file:///DIR, or
    /// s3://BUCKET?region=…&endpoint=… (credentials from the AWS chain). Edges list it
    /// among their --upstream caches.
    #[arg(long, value_name = "URI", env = "BINPLZ_STORE_URI")]
    store_uri: String,

    /// Nix secret key that signs the outputs (`nix key generate-secret`).
    #[arg(long, value_name = "FILE", env = "BINPLZ_SECRET_KEY_FILE")]
    secret_key_file: PathBuf,

    /// Directory of the state database, logs and staging caches.
    #[arg(long, value_name = "DIR", env = "BINPLZ_STATE_DIR")]
    state_dir: PathBuf,

    /// Builds at once.
    #[arg(
        long,
        value_name = "N",
        env = "BINPLZ_MAX_PARALLEL",
        default_value_t = 1
    )]
    max_parallel: usize,

    /// Longest a build may run (nix-store --timeout), e.g. 120m, 600s.
    #[arg(long, value_name = "DURATION", env = "BINPLZ_TIMEOUT", default_value = "120m", value_parser = parse_duration)]
    timeout: Duration,

    /// Longest a build may print nothing (nix-store --max-silent-time).
    #[arg(long, value_name = "DURATION", env = "BINPLZ_MAX_SILENT_TIME", default_value = "30m", value_parser = parse_duration)]
    max_silent_time: Duration,

    /// Most log a build may write (Nix's max-build-log-size); more is a permanent failure.
    #[arg(long, value_name = "BYTES", env = "BINPLZ_MAX_LOG_SIZE", default_value = "64M", value_parser = parse_bytes)]
    max_log_size: u64,

    /// Largest NAR an output may have; a larger output is not uploaded (permanent failure).
    #[arg(long, value_name = "BYTES", env = "BINPLZ_MAX_NAR_SIZE", default_value = "2G", value_parser = parse_bytes)]
    max_nar_size: u64,

    /// CPU cores one build may use (nix-store --cores; 0: all).
    #[arg(long, value_name = "N", env = "BINPLZ_CORES", default_value_t = 0)]
    cores: u32,

    /// Build hours a calendar month (UTC); once spent, new builds wait in the queue.
    #[arg(
        long,
        value_name = "HOURS",
        env = "BINPLZ_MONTHLY_BUDGET",
        default_value_t = 100.0
    )]
    monthly_budget: f64,

    /// New builds one client address may start an hour; more are refused (429).
    #[arg(
        long,
        value_name = "N",
        env = "BINPLZ_PER_CLIENT_BUILDS",
        default_value_t = 10
    )]
    per_client_builds: u32,

    /// Delay before the first retry of a transient failure; the n-th waits this × 3^(n−1).
    #[arg(long, value_name = "DURATION", env = "BINPLZ_RETRY_DELAY", default_value = "60s", value_parser = parse_duration)]
    retry_delay: Duration,

    /// File holding the operator token (retry and cancel, from the API and the page).
    /// Without it the builder is read-only.
    #[arg(long, value_name = "FILE", env = "BINPLZ_OPERATOR_TOKEN_FILE")]
    operator_token_file: Option<PathBuf>,
}

/// Characters that would change the meaning of the `file://…?secret-key=…` URL given to
/// `nix copy`.
fn url_safe(p: &std::path::Path) -> bool {
    p.to_str()
        .is_some_and(|s| s.starts_with('/') && !s.contains(['?', '&', '#', '=', ' ']))
}

impl BuilderArgs {
    fn config(self) -> Result<Config, CliError> {
        let store = StoreUri::parse(&self.store_uri).map_err(|e| bad(e.to_string()))?;
        let abs = |p: PathBuf, what: &str| -> Result<PathBuf, CliError> {
            let p = std::path::absolute(&p).map_err(|e| bad(format!("{what}: {e}")))?;
            if url_safe(&p) {
                Ok(p)
            } else {
                Err(bad(format!(
                    "{what} {} must not contain ?, &, #, = or spaces",
                    p.display()
                )))
            }
        };
        let secret_key_file = abs(self.secret_key_file, "--secret-key-file")?;
        std::fs::metadata(&secret_key_file).map_err(|e| {
            bad(format!(
                "--secret-key-file {}: {e}",
                secret_key_file.display()
            ))
        })?;
        let state_dir = abs(self.state_dir, "--state-dir")?;
        let operator_token = match self.operator_token_file {
            None => None,
            Some(f) => {
                let t = std::fs::read_to_string(&f)
                    .map_err(|e| bad(format!("--operator-token-file {}: {e}", f.display())))?;
                let t = t.trim();
                if t.len() < 8 {
                    return Err(bad(format!(
                        "--operator-token-file {}: the token needs at least 8 characters",
                        f.display()
                    )));
                }
                Some(OperatorToken::new(t.to_owned()))
            }
        };
        if self.max_parallel == 0 {
            return Err(bad("--max-parallel must be at least 1".into()));
        }
        if !(self.monthly_budget.is_finite() && self.monthly_budget >= 0.0) {
            return Err(bad("--monthly-budget must be a number of hours ≥ 0".into()));
        }
        Ok(Config {
            indexes: self.indexes,
            max_index_size: self.index_limit.bytes()?,
            index_poll: self.index_poll.max(Duration::from_millis(100)),
            store,
            secret_key_file,
            state_dir,
            max_parallel: self.max_parallel,
            timeout: self.timeout,
            max_silent_time: self.max_silent_time,
            max_log_size: self.max_log_size,
            max_nar_size: self.max_nar_size,
            cores: self.cores,
            monthly_budget: self.monthly_budget * 3600.0,
            per_client_builds: self.per_client_builds,
            retry_delay: self.retry_delay,
            operator_token,
        })
    }
}

/// Runs `binplz builder` until SIGTERM or SIGINT.
pub fn run_builder(args: BuilderArgs) -> Result<(), CliError> {
    let listen = args.listen;
    let config = args.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
    rt.block_on(async move {
        let builder = Builder::open(config).map_err(|e| bad(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| (ErrorKind::Internal, format!("cannot listen on {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
        tracing::info!(target: "binplz::builder", %addr, store = %builder.config().store, "listening");
        let reload = builder.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                reload.reload_indexes(true).await;
            }
        });
        super::run(listener, builder, shutdown_signal())
            .await
            .map_err(|e| (ErrorKind::Internal, e.to_string()))
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
