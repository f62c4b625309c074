//! The operator page (`GET /`): the queue with positions, running builds with their
//! elapsed time, recent successes, failures with class, reason and log link, and this
//! month's budget. With `--operator-token-file`, retry and cancel buttons POST to the API
//! with `Authorization: Bearer` and the token the operator typed (kept in the browser's
//! sessionStorage only); without it the page is read-only.
//!
//! Plain HTML and a little inline script, nothing loaded from elsewhere; everything from
//! the state is escaped.

use std::fmt::Write;

use super::state::{Build, Phase};
use super::{basename, trim_float, unix_now, Builder, BuilderError};
use crate::server::page::html_escape as esc;

/// Rows shown per table.
const ROWS: u32 = 50;

const STYLE: &str = "
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#1d2127;background:#fbfbfa}
h1{font-size:1.5rem;margin:0 0 .25rem}
h2{font-size:1.1rem;margin:2rem 0 .5rem;border-bottom:1px solid #ddd;padding-bottom:.25rem}
.sub{color:#5b6470;margin:0 0 1rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #eee;vertical-align:top}
th{font-weight:600;color:#5b6470;font-size:.85rem;text-transform:uppercase;letter-spacing:.03em}
code{font:13px ui-monospace,monospace;word-break:break-all}
.empty{color:#8a929c;font-style:italic}
.class{display:inline-block;padding:0 .45rem;border-radius:.6rem;font-size:.8rem;background:#fde8e8;color:#9b1c1c}
.class.transient{background:#fef3c7;color:#92400e}
.budget{display:flex;gap:2rem;align-items:center;padding:.75rem 1rem;border:1px solid #e5e7eb;border-radius:.5rem;background:#fff}
.bar{flex:1;height:.6rem;background:#eef0f2;border-radius:.3rem;overflow:hidden}
.bar span{display:block;height:100%;background:#2563eb}
.bar.spent span{background:#dc2626}
.warn{color:#9b1c1c;font-weight:600}
button{font:inherit;font-size:.85rem;padding:.15rem .7rem;border:1px solid #c7ccd1;border-radius:.35rem;background:#fff;cursor:pointer}
button:hover{background:#f1f5f9}
#auth{display:flex;gap:.5rem;align-items:center;margin:1rem 0}
#auth input{font:inherit;padding:.2rem .5rem;border:1px solid #c7ccd1;border-radius:.35rem}
#msg{margin-left:.5rem;color:#5b6470}
";

const SCRIPT: &str = r#"
const KEY = 'binplz-operator-token';
const msg = t => { document.getElementById('msg').textContent = t; };
function saveToken() {
  const v = document.getElementById('token').value.trim();
  if (v) { sessionStorage.setItem(KEY, v); msg('token kept for this tab'); }
}
async function act(button) {
  const token = sessionStorage.getItem(KEY);
  if (!token) { msg('enter the operator token first'); return; }
  const url = '/builds/' + encodeURIComponent(button.dataset.drv) + '/' + button.dataset.action;
  const r = await fetch(url, { method: 'POST', headers: { 'Authorization': 'Bearer ' + token } });
  if (r.ok) { msg(button.dataset.action + ' done'); setTimeout(() => location.reload(), 300); }
  else { msg(button.dataset.action + ' refused: HTTP ' + r.status); }
}
document.addEventListener('click', e => {
  const b = e.target.closest('button[data-action]');
  if (b) act(b);
});
document.addEventListener('DOMContentLoaded', () => {
  if (sessionStorage.getItem(KEY)) msg('token kept for this tab');
});
"#;

/// `12m 5s`, `3h 2m`.
fn elapsed(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

fn ago(at: Option<i64>, now: i64) -> String {
    at.map_or_else(String::new, |t| {
        format!("{} ago", elapsed(now.saturating_sub(t).max(0) as u64))
    })
}

fn drv_cell(drv: &str) -> String {
    format!("<code title=\"{}\">{}</code>", esc(drv), esc(basename(drv)))
}

fn button(drv: &str, action: &str, operator: bool) -> String {
    if !operator {
        return String::new();
    }
    format!(
        "<button type=\"button\" data-action=\"{action}\" data-drv=\"{}\">{action}</button>",
        esc(basename(drv))
    )
}

fn table(out: &mut String, head: &[&str], rows: &[String], empty: &str) {
    if rows.is_empty() {
        let _ = writeln!(out, "<p class=\"empty\">{empty}</p>");
        return;
    }
    out.push_str("<table><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr></thead><tbody>\n");
    for r in rows {
        let _ = writeln!(out, "<tr>{r}</tr>");
    }
    out.push_str("</tbody></table>\n");
}

/// The page.
pub fn render(builder: &Builder) -> Result<String, BuilderError> {
    let state = builder.state();
    let config = builder.config();
    let operator = config.operator_token.is_some();
    let now = unix_now();
    let used = state.used_seconds(now)?;
    let budget = config.monthly_budget;
    let waiting = builder.waiting()?;
    let mut out = String::with_capacity(16 << 10);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>binplz builder</title><style>{STYLE}</style></head><body>\n\
         <h1>binplz builder</h1><p class=\"sub\">store {} · up to {} at once · \
         {} new builds per client an hour</p>\n",
        esc(&config.store.to_string()),
        config.max_parallel,
        config.per_client_builds,
    );

    let pct = if budget > 0.0 {
        (used / budget * 100.0).clamp(0.0, 100.0)
    } else {
        100.0
    };
    let _ = writeln!(
        out,
        "<h2>Budget this month</h2><div class=\"budget\" id=\"budget\"><span>{} h of {} h used</span>\
         <div class=\"bar{}\"><span style=\"width:{pct:.1}%\"></span></div>{}</div>",
        trim_float(used / 3600.0),
        trim_float(budget / 3600.0),
        if waiting.is_some() { " spent" } else { "" },
        waiting
            .as_deref()
            .map(|w| format!("<span class=\"warn\">new builds wait: {}</span>", esc(w)))
            .unwrap_or_default(),
    );

    if operator {
        out.push_str(
            "<div id=\"auth\"><label for=\"token\">Operator token</label>\
             <input id=\"token\" type=\"password\" autocomplete=\"off\">\
             <button type=\"button\" id=\"save\" onclick=\"saveToken()\">Use</button>\
             <span id=\"msg\"></span></div>\n",
        );
    } else {
        out.push_str("<p class=\"sub\" id=\"readonly\">Read-only: this builder has no operator token.</p><span id=\"msg\"></span>\n");
    }

    let running = builder.running();
    let rows: Vec<String> = running
        .iter()
        .map(|(drv, t)| {
            format!(
                "<td>{}</td><td>{}</td><td>{}</td>",
                drv_cell(drv),
                elapsed(t.as_secs()),
                button(drv, "cancel", operator)
            )
        })
        .collect();
    out.push_str("<h2>Running</h2>\n");
    table(
        &mut out,
        &["derivation", "elapsed", ""],
        &rows,
        "nothing is building",
    );

    let queued = state.list(Phase::Queued, ROWS)?;
    let rows: Vec<String> = queued
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "<td>{i}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                drv_cell(&b.drv_path),
                b.attempts,
                ago(Some(b.created), now),
                button(&b.drv_path, "cancel", operator)
            )
        })
        .collect();
    out.push_str("<h2 id=\"queue\">Queue</h2>\n");
    table(
        &mut out,
        &["position", "derivation", "attempts", "asked", ""],
        &rows,
        "the queue is empty",
    );

    let failed = state.list(Phase::Failed, ROWS)?;
    let rows: Vec<String> = failed
        .iter()
        .map(|b| failure_row(b, now, operator))
        .collect();
    out.push_str("<h2 id=\"failures\">Failures</h2>\n");
    table(
        &mut out,
        &[
            "derivation",
            "class",
            "reason",
            "attempts",
            "when",
            "log",
            "",
        ],
        &rows,
        "no failures",
    );

    let built = state.list(Phase::Built, ROWS)?;
    let rows: Vec<String> = built
        .iter()
        .map(|b| {
            let outputs: Vec<String> = b
                .outputs
                .iter()
                .map(|(name, path)| format!("{}: <code>{}</code>", esc(name), esc(path)))
                .collect();
            format!(
                "<td>{}</td><td>{}</td><td>{}</td>",
                drv_cell(&b.drv_path),
                outputs.join("<br>"),
                ago(b.finished, now)
            )
        })
        .collect();
    out.push_str("<h2 id=\"built\">Recent successes</h2>\n");
    table(
        &mut out,
        &["derivation", "outputs", "when"],
        &rows,
        "nothing built yet",
    );

    let _ = write!(out, "<script>{SCRIPT}</script>\n</body></html>\n");
    Ok(out)
}

fn failure_row(b: &Build, now: i64, operator: bool) -> String {
    let (class, reason) = b
        .failure
        .as_ref()
        .map(|f| {
            let mut reason = esc(&f.reason);
            if let Some(at) = b.retry_at {
                let _ = write!(
                    reason,
                    " <em>(next try in {})</em>",
                    elapsed(at.saturating_sub(now).max(0) as u64)
                );
            }
            (f.class.as_str(), reason)
        })
        .unwrap_or(("", String::new()));
    let log = if b.has_log {
        format!(
            "<a href=\"/builds/{}/log\">log</a>",
            esc(basename(&b.drv_path))
        )
    } else {
        String::new()
    };
    format!(
        "<td>{}</td><td><span class=\"class {class}\">{class}</span></td><td>{reason}</td>\
         <td>{}</td><td>{}</td><td>{log}</td><td>{}</td>",
        drv_cell(&b.drv_path),
        b.attempts,
        ago(b.finished, now),
        button(&b.drv_path, "retry", operator)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(elapsed(5), "5s");
        assert_eq!(elapsed(65), "1m 5s");
        assert_eq!(elapsed(3 * 3600 + 120), "3h 2m");
    }
}
