//! Reading a Nixpkgs evaluation: `nix-eval-jobs` JSON lines, or `nix-env -qaP --out-path
//! --json` (one JSON object keyed by attribute path). The format is detected.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::Deserialize;

use super::EvalFailure;

/// Largest single line or document accepted. A nix-env listing of all of Nixpkgs with
/// `--meta` is about 200 MB; a nix-eval-jobs line is a few KiB.
const MAX_EVAL_BYTES: u64 = 1 << 30;

/// One attribute of the evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalAttr {
    pub attr: String,
    pub attr_path_len: u32,
    pub system: String,
    /// Output name → store path.
    pub outputs: BTreeMap<String, String>,
    pub main_program: Option<String>,
    /// The derivation that builds the outputs (`drvPath`), when the evaluation gave it.
    pub drv_path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalFormat {
    EvalJobs,
    NixEnv,
}

/// What one file gave.
#[derive(Debug, Default)]
pub struct EvalRead {
    pub attrs: Vec<EvalAttr>,
    pub failures: Vec<EvalFailure>,
    /// `(line number, reason)` of lines that were skipped; the line is 0 for entries of a
    /// nix-env document, whose reason names the attribute instead.
    pub bad_lines: Vec<(usize, String)>,
    pub format: Option<EvalFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}: not nix-eval-jobs JSON lines nor nix-env JSON: {err}")]
    Format { path: String, err: String },
}

#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "mainProgram")]
    main_program: Option<String>,
}

#[derive(Deserialize)]
struct JobLine {
    attr: Option<String>,
    #[serde(rename = "attrPath")]
    attr_path: Option<Vec<String>>,
    system: Option<String>,
    outputs: Option<BTreeMap<String, Option<String>>>,
    meta: Option<Meta>,
    error: Option<String>,
    #[serde(rename = "drvPath")]
    drv_path: Option<String>,
}

#[derive(Deserialize)]
struct NixEnvPkg {
    system: Option<String>,
    outputs: Option<BTreeMap<String, Option<String>>>,
    #[serde(rename = "outPath")]
    out_path: Option<String>,
    meta: Option<Meta>,
    #[serde(rename = "drvPath")]
    drv_path: Option<String>,
}

/// Reads one evaluation file, detecting its format from its first line.
pub fn read(path: &Path) -> Result<EvalRead, EvalError> {
    let file = std::fs::File::open(path).map_err(|err| EvalError::Io {
        path: path.display().to_string(),
        err,
    })?;
    read_from(file, &path.display().to_string())
}

/// Reads an evaluation from any reader; `name` is used in messages.
pub fn read_from(source: impl Read, name: &str) -> Result<EvalRead, EvalError> {
    let io = |err| EvalError::Io {
        path: name.to_owned(),
        err,
    };
    let mut r = BufReader::new(source.take(MAX_EVAL_BYTES));
    let mut first = String::new();
    r.read_line(&mut first).map_err(io)?;
    let first_is_job = serde_json::from_str::<serde_json::Value>(first.trim())
        .ok()
        .is_some_and(|v| v.get("attr").is_some() || v.get("error").is_some());
    if first_is_job {
        let mut out = EvalRead {
            format: Some(EvalFormat::EvalJobs),
            ..EvalRead::default()
        };
        job_line(&first, 1, &mut out);
        for (i, line) in r.lines().enumerate() {
            let line = line.map_err(io)?;
            job_line(&line, i + 2, &mut out);
        }
        return Ok(out);
    }
    let mut rest = first.into_bytes();
    r.read_to_end(&mut rest).map_err(io)?;
    if rest.trim_ascii().is_empty() {
        return Ok(EvalRead::default());
    }
    let doc: BTreeMap<String, serde_json::Value> = match serde_json::from_slice(&rest) {
        Ok(doc) => doc,
        Err(e) => {
            // JSON lines whose first line is damaged: still read line by line, so one bad
            // line costs that line, not the file. Only when some line is a job, though:
            // otherwise the document's own parse error says more.
            let mut out = EvalRead {
                format: Some(EvalFormat::EvalJobs),
                ..EvalRead::default()
            };
            for (i, line) in String::from_utf8_lossy(&rest).lines().enumerate() {
                job_line(line, i + 1, &mut out);
            }
            if out.attrs.is_empty() && out.failures.is_empty() {
                return Err(EvalError::Format {
                    path: name.to_owned(),
                    err: e.to_string(),
                });
            }
            return Ok(out);
        }
    };
    let mut out = EvalRead {
        format: Some(EvalFormat::NixEnv),
        ..EvalRead::default()
    };
    for (attr, value) in doc {
        let pkg: NixEnvPkg = match serde_json::from_value(value) {
            Ok(p) => p,
            Err(e) => {
                out.bad_lines.push((0, format!("{attr}: {e}")));
                continue;
            }
        };
        let mut outputs: BTreeMap<String, String> = pkg
            .outputs
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect();
        if outputs.is_empty() {
            if let Some(p) = pkg.out_path {
                outputs.insert("out".into(), p);
            }
        }
        if outputs.is_empty() {
            out.bad_lines.push((0, format!("{attr}: no outputs")));
            continue;
        }
        let Some(system) = pkg.system else {
            out.bad_lines.push((0, format!("{attr}: no system")));
            continue;
        };
        out.attrs.push(EvalAttr {
            attr_path_len: attr.split('.').count() as u32,
            attr,
            system,
            outputs,
            main_program: pkg.meta.and_then(|m| m.main_program),
            drv_path: pkg.drv_path,
        });
    }
    Ok(out)
}

fn job_line(line: &str, n: usize, out: &mut EvalRead) {
    let line = line.trim();
    if line.is_empty() {
        return;
    }
    let job: JobLine = match serde_json::from_str(line) {
        Ok(j) => j,
        Err(e) => {
            out.bad_lines.push((n, e.to_string()));
            return;
        }
    };
    let attr = match (job.attr, &job.attr_path) {
        (Some(a), _) => a,
        (None, Some(p)) => p.join("."),
        (None, None) => {
            out.bad_lines.push((n, "no attr".into()));
            return;
        }
    };
    let system = job.system.unwrap_or_default();
    if let Some(message) = job.error {
        out.failures.push(EvalFailure {
            system,
            attr,
            message,
        });
        return;
    }
    if system.is_empty() {
        out.bad_lines.push((n, format!("{attr}: no system")));
        return;
    }
    let outputs: BTreeMap<String, String> = job
        .outputs
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    if outputs.is_empty() {
        out.bad_lines.push((n, format!("{attr}: no outputs")));
        return;
    }
    out.attrs.push(EvalAttr {
        attr_path_len: job
            .attr_path
            .map_or_else(|| attr.split('.').count(), |p| p.len()) as u32,
        attr,
        system,
        outputs,
        main_program: job.meta.and_then(|m| m.main_program),
        drv_path: job.drv_path,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> EvalRead {
        read(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/eval")
                .join(name),
        )
        .expect("reads")
    }

    #[test]
    fn both_formats_of_the_fixture_evaluation_agree() {
        let jobs = fixture("nix-eval-jobs.jsonl");
        let env = fixture("nix-env-meta.json");
        assert_eq!(jobs.format, Some(EvalFormat::EvalJobs));
        assert_eq!(env.format, Some(EvalFormat::NixEnv));
        assert_eq!(jobs.failures.len(), 1);
        assert_eq!(jobs.failures[0].attr, "broken");
        let key = |a: &EvalAttr| {
            (
                a.attr.clone(),
                a.outputs.clone(),
                a.main_program.clone(),
                a.drv_path.clone(),
            )
        };
        let mut j: Vec<_> = jobs.attrs.iter().map(key).collect();
        let mut e: Vec<_> = env.attrs.iter().map(key).collect();
        j.sort();
        e.sort();
        assert_eq!(j, e);
        let multi = jobs
            .attrs
            .iter()
            .find(|a| a.attr == "multi")
            .expect("multi");
        assert_eq!(multi.outputs.len(), 2);
        assert_eq!(multi.main_program.as_deref(), Some("multi-tool"));
        // Every attribute carries the derivation that builds it.
        assert!(jobs.attrs.iter().all(|a| a
            .drv_path
            .as_deref()
            .is_some_and(|d| d.starts_with("/nix/store/") && d.ends_with(".drv"))));
    }

    #[test]
    fn bad_lines_are_reported_with_their_numbers_and_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("eval.jsonl");
        std::fs::write(
            &p,
            "{\"attr\":\"a\",\"attrPath\":[\"a\"],\"system\":\"x86_64-linux\",\"outputs\":{\"out\":\"/nix/store/x\"}}\n\
             {not json\n\
             {\"attr\":\"b\",\"error\":\"boom\"}\n",
        )
        .expect("write");
        let r = read(&p).expect("reads");
        assert_eq!(r.attrs.len(), 1);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.bad_lines.len(), 1);
        assert_eq!(r.bad_lines[0].0, 2);
    }

    #[test]
    fn damaged_first_line_does_not_hide_the_jobs_after_it() {
        let text = "{\"attr\":\"a\",\"outp\n\
             {\"attr\":\"b\",\"system\":\"x86_64-linux\",\"outputs\":{\"out\":\"/nix/store/x\"}}\n";
        let r = read_from(text.as_bytes(), "t").expect("reads");
        assert_eq!(r.format, Some(EvalFormat::EvalJobs));
        assert_eq!(r.attrs.len(), 1);
        assert_eq!(r.bad_lines.len(), 1);
        assert_eq!(r.bad_lines[0].0, 1);
        // Without any job line, the document's own error is reported.
        assert!(matches!(
            read_from(&b"{\"a\": 1,\n"[..], "t"),
            Err(EvalError::Format { .. })
        ));
    }

    #[test]
    fn empty_evaluation_reads_as_empty() {
        let r = read_from(&b" \n\n"[..], "t").expect("reads");
        assert!(r.attrs.is_empty() && r.failures.is_empty() && r.bad_lines.is_empty());
    }

    #[test]
    fn nix_env_entry_without_outputs_is_skipped_by_name() {
        let text = r#"{"a": {"system": "x86_64-linux"},
            "b": {"system": "x86_64-linux", "outputs": {"out": "/nix/store/x"}}}"#;
        let r = read_from(text.as_bytes(), "t").expect("reads");
        assert_eq!(r.format, Some(EvalFormat::NixEnv));
        assert_eq!(r.attrs.len(), 1);
        assert_eq!(r.bad_lines, [(0, "a: no outputs".to_owned())]);
    }
}
