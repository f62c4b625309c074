//! Running the real `binplz` binary and checking what it printed.

use std::process::{Command, Output};

use binplz::error::ErrorKind;

/// The binary, with no `BINPLZ_*` setting inherited from the environment.
pub fn binplz() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_binplz"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BINPLZ_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running binplz")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "binplz failed ({}): {}",
        out.status,
        stderr(out)
    );
}

/// Exactly one line on stderr, `binplz: error: …`, nothing on stdout, and the exit status
/// of `kind`; returns the line.
#[track_caller]
pub fn assert_failure(out: &Output, kind: ErrorKind) -> String {
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(lines[0].starts_with("binplz: error: "), "{err}");
    assert_eq!(
        out.status.code(),
        Some(i32::from(kind.exit_code())),
        "expected {kind} ({}): {err}",
        kind.exit_code()
    );
    assert!(out.stdout.is_empty(), "a failure printed to stdout");
    lines[0].to_owned()
}

/// A child's standard error (piped), a line at a time, read on a thread of its own.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    lines
}
