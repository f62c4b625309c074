//! Responses: header names, the one error-to-status mapping, and error bodies that are
//! safe shell scripts.
//!
//! An error on a binary route keeps its non-2xx status, and its body is a POSIX `sh` script
//! that prints the reason to stderr and exits 1: `curl … > tree; chmod +x tree; ./tree`
//! after a failure explains itself instead of running garbage. Everything interpolated
//! into the script is single-quoted with quotes escaped and control characters removed,
//! so a requested name like `x;reboot` or `$(id)` can never execute.

use std::fmt::Write as _;

use http::{header, HeaderValue, Response, StatusCode};

use super::body::Body;
use crate::error::ErrorKind;

pub const X_NIX_STORE_PATH: &str = "x-nix-store-path";
pub const X_NIX_ATTR: &str = "x-nix-attr";
pub const X_NIXPKGS_REVISION: &str = "x-nixpkgs-revision";
pub const X_BINPLZ_SHA256: &str = "x-binplz-sha256";
pub const X_BINPLZ_LINKAGE: &str = "x-binplz-linkage";
pub const X_BINPLZ_CANDIDATES: &str = "x-binplz-candidates";
pub const X_BINPLZ_CACHE: &str = "x-binplz-cache";

pub const OCTET_STREAM: &str = "application/octet-stream";
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
pub const TEXT_HTML: &str = "text/html; charset=utf-8";
pub const APPLICATION_JSON: &str = "application/json";
pub const SHELL_SCRIPT: &str = "text/x-shellscript; charset=utf-8";
pub const NIX_CACHE_INFO: &str = "text/x-nix-cache-info";
pub const NIX_NARINFO: &str = "text/x-nix-narinfo";
pub const NIX_NAR: &str = "application/x-nix-nar";
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Seconds a client should wait before asking again for something not built or while
/// binplz is overloaded.
pub const RETRY_AFTER_SECS: u64 = 60;

/// The status for each kind of error: the only place where errors become statuses.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::UnknownProgram => StatusCode::NOT_FOUND,
        ErrorKind::NotBuilt | ErrorKind::NotInCache => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Refused => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::UpstreamBroken | ErrorKind::VerificationFailed => StatusCode::BAD_GATEWAY,
        ErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        // A 4xx curl's `--retry` does not retry (it retries 408, 429 and 5xx): waiting
        // will not change a failed build. 424: the request depended on a build that failed.
        ErrorKind::BuildFailed => StatusCode::FAILED_DEPENDENCY,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Quotes `s` for `sh`: single quotes, with `'` written as `'\''`, and every control
/// character (newlines included) dropped so the text stays on its line.
pub fn sh_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// The script body of an error response.
pub fn error_script(status: StatusCode, message: &str) -> String {
    error_script_lines(status, &[message])
}

/// The script body of an error response saying `lines`, each on its own line of stderr.
pub fn error_script_lines(status: StatusCode, lines: &[&str]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    let _ = writeln!(
        s,
        "# binplz could not serve this file (HTTP {}).",
        status.as_u16()
    );
    for line in lines {
        let _ = writeln!(
            s,
            "printf '%s\\n' {} >&2",
            sh_quote(&format!("binplz: {line}"))
        );
    }
    s.push_str("exit 1\n");
    s
}

/// An error response. Binary routes get the script body; `head` drops the body.
pub fn error(kind: ErrorKind, message: &str, head: bool) -> Response<Body> {
    error_lines(kind, &[message], head)
}

/// An error response whose script says `lines`.
pub fn error_lines(kind: ErrorKind, lines: &[&str], head: bool) -> Response<Body> {
    let status = status_of(kind);
    let mut resp = script_response(status, error_script_lines(status, lines), head);
    if matches!(
        kind,
        ErrorKind::NotBuilt
            | ErrorKind::NotInCache
            | ErrorKind::Overloaded
            | ErrorKind::RateLimited
    ) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    resp
}

/// A response with the error `status` and the script body saying `message`, for statuses
/// that are the protocol's rather than an [`ErrorKind`]'s (405, 414, 416, 431, a missing
/// page). Every 4xx and 5xx binplz answers has this body, on every route: whatever a failed
/// `curl -o` saved explains itself when run, instead of running as commands or as an empty
/// script that succeeds. `head` drops the body.
pub fn error_status(status: StatusCode, message: &str, head: bool) -> Response<Body> {
    script_response(status, error_script(status, message), head)
}

/// A response with the error `status` and `body`, a script from [`error_script_lines`].
pub fn script_response(status: StatusCode, body: String, head: bool) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::from(body)
    });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SHELL_SCRIPT));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A plain response with a content type.
pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: String,
    head: bool,
) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::from(body)
    });
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a script with `sh` and returns (exit status, stdout, stderr).
    fn run_sh(script: &str) -> (i32, String, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("tree");
        std::fs::write(&p, script).expect("write");
        let out = std::process::Command::new("sh")
            .arg(&p)
            .current_dir(dir.path())
            .output()
            .expect("sh runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn error_scripts_print_their_reason_and_fail() {
        let (code, out, err) = run_sh(&error_script(
            StatusCode::NOT_FOUND,
            "unknown program \"tre\"",
        ));
        assert_eq!(code, 1);
        assert_eq!(out, "");
        assert_eq!(err, "binplz: unknown program \"tre\"\n");
    }

    #[test]
    fn hostile_text_never_executes() {
        for evil in [
            "x;touch pwned",
            "$(touch pwned)",
            "`touch pwned`",
            "a'; touch pwned; echo '",
            "line\ntouch pwned",
            "%s%n\\",
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("s");
            std::fs::write(&p, error_script(StatusCode::BAD_REQUEST, evil)).expect("write");
            let out = std::process::Command::new("sh")
                .arg(&p)
                .current_dir(dir.path())
                .output()
                .expect("sh");
            assert_eq!(out.status.code(), Some(1), "{evil}");
            assert!(!dir.path().join("pwned").exists(), "{evil} executed");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.starts_with("binplz: "), "{err}");
        }
    }

    #[test]
    fn every_kind_has_a_non_2xx_status() {
        use ErrorKind::*;
        for k in [
            BadRequest,
            UnknownProgram,
            NotBuilt,
            NotInCache,
            Refused,
            UpstreamBroken,
            VerificationFailed,
            TimedOut,
            Overloaded,
            BuildFailed,
            RateLimited,
            Internal,
        ] {
            assert!(!status_of(k).is_success());
        }
    }
}
