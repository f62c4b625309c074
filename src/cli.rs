//! The command line: flags parsed once into typed values, errors turned into one line and
//! an exit status (see [`ErrorKind::exit_code`]).

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::error::ErrorKind;
use crate::extract::{self, ExtractError, Extracted, Extractor};
use crate::narinfo::{Trust, CACHE_NIXOS_ORG_KEY};
use crate::resolve::RelPath;
use crate::upstream::{self, Cache, ClientConfig};

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
}

#[derive(Debug, Args)]
struct ExtractArgs {
    /// Binary cache to fetch from: http://, https:// or file:///path. May repeat; tried in order.
    #[arg(long = "upstream", value_name = "URL", env = "BINPLZ_UPSTREAM", value_delimiter = ' ',
          default_value = "https://cache.nixos.org")]
    upstreams: Vec<String>,

    /// Public key whose signatures are trusted (NAME:BASE64). May repeat.
    /// Default: cache.nixos.org's key.
    #[arg(long = "trusted-public-key", value_name = "NAME:BASE64", env = "BINPLZ_TRUSTED_PUBLIC_KEY",
          value_delimiter = ' ')]
    trusted_public_keys: Vec<String>,

    /// Accept narinfos without a valid trusted signature (NarHash is still checked).
    #[arg(long)]
    no_require_sigs: bool,

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

/// Runs the command line and returns the process's exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Extract(args) => run_extract(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((kind, msg)) => {
            eprintln!("binplz: error: {msg}");
            ExitCode::from(kind.exit_code())
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BINPLZ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).try_init();
}

type CliError = (ErrorKind, String);

fn fail(e: ExtractError) -> CliError {
    (e.kind(), e.to_string())
}

fn run_extract(args: ExtractArgs) -> Result<(), CliError> {
    let bad = |msg: String| (ErrorKind::BadRequest, msg);
    let tmp_dir = extract::temp_dir_for(args.output.as_deref());
    let extracted = match &args.nar {
        Some(nar) => {
            let [path] = args.args.as_slice() else {
                return Err(bad("with --nar, give only the PATH inside the NAR".into()));
            };
            let nar_hash = match &args.nar_hash {
                Some(h) => Some(crate::hash::parse_sha256(h).ok_or_else(|| bad(format!("invalid --nar-hash {h:?}")))?),
                None => None,
            };
            extract::extract_local(nar, nar_hash, &RelPath::parse(path.as_bytes()), &tmp_dir, args.allow_nix_store_deps)
                .map_err(fail)?
        }
        None => {
            let [store_path, path] = args.args.as_slice() else {
                return Err(bad("give a STORE_PATH and a PATH inside it (or use --nar FILE PATH)".into()));
            };
            let store_path = extract::parse_store_path(store_path).map_err(fail)?;
            let keys = if args.trusted_public_keys.is_empty() {
                vec![CACHE_NIXOS_ORG_KEY.to_owned()]
            } else {
                args.trusted_public_keys.clone()
            };
            let trust = Trust::new(&keys, !args.no_require_sigs).map_err(|e| bad(e.to_string()))?;
            let config = ClientConfig::default();
            let caches = args
                .upstreams
                .iter()
                .map(|u| upstream::open(u, &config).map(Cache::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            let extractor = Extractor::new(caches, trust, args.allow_nix_store_deps);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
            let path = RelPath::parse(path.as_bytes());
            runtime.block_on(extractor.extract(&store_path, &path, &tmp_dir)).map_err(fail)?
        }
    };
    write_out(extracted, args.output.as_deref()).map_err(|e| (ErrorKind::Internal, e))
}

/// Moves the verified file into place (or copies it to stdout), then reports the verdict.
fn write_out(extracted: Extracted, output: Option<&Path>) -> Result<(), String> {
    let Extracted { file, size, executable, sha256, linkage, path, .. } = extracted;
    match output {
        Some(out) => {
            let mode = if executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot set permissions: {e}"))?;
            file.as_file().sync_all().map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            file.persist(out).map_err(|e| format!("cannot write {}: {}", out.display(), e.error))?;
        }
        None => {
            let mut f = file.reopen().map_err(|e| e.to_string())?;
            let mut stdout = io::stdout().lock();
            io::copy(&mut f, &mut stdout).and_then(|_| stdout.flush()).map_err(|e| format!("writing to stdout: {e}"))?;
        }
    }
    eprintln!("binplz: {path}: {linkage}, {size} bytes, sha256 {}", crate::hash::hex(&sha256));
    Ok(())
}
