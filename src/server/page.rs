//! The home page (plain text for curl, a small HTML page for browsers) and search.

use http::{header, HeaderMap, StatusCode};

use super::body::Body;
use super::respond::{error_status, text, APPLICATION_JSON, TEXT_HTML, TEXT_PLAIN};
use crate::index::{Index, Lookup};

/// Most search results returned.
const MAX_RESULTS: usize = 50;
/// Longest query accepted.
const MAX_QUERY: usize = 100;

fn wants(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(mime))
}

pub(crate) fn html_escape(s: &str) -> String {
    s.chars()
        .fold(String::with_capacity(s.len()), |mut out, c| {
            match c {
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '&' => out.push_str("&amp;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&#39;"),
                c => out.push(c),
            }
            out
        })
}

pub(super) fn host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost:8080")
        .to_owned()
}

pub fn home(
    index: Option<&Index>,
    system: &str,
    headers: &HeaderMap,
    head: bool,
) -> http::Response<Body> {
    let host = host(headers);
    let (programs, revision) =
        index.map_or((0, None), |i| (i.len(), i.metadata().revision.clone()));
    let revision = revision.unwrap_or_else(|| "unknown".into());
    // The usage line names a program this index really serves.
    let example = ["tree", "hello"]
        .into_iter()
        .find(|p| index.is_some_and(|i| matches!(i.resolve(system, p, None), Lookup::Found(_))))
        .unwrap_or("tree");
    if wants(headers, "text/html") {
        let body = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>binplz</title>\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<style>body{{font-family:system-ui,sans-serif;max-width:42rem;margin:3rem auto;padding:0 1rem;line-height:1.5}}\
code,pre{{background:#f4f4f4;padding:.2rem .4rem;border-radius:4px}}pre{{padding:1rem;overflow-x:auto}}</style></head>\
<body><h1>binplz</h1><p>Any program from Nixpkgs as one static binary, verified against the binary cache's \
signatures before a single byte is sent.</p>\
<pre>curl -fsSL http://{h}/{ex} -o {ex} &amp;&amp; chmod +x {ex} &amp;&amp; ./{ex}</pre>\
<p>Also <code>/ATTR/PROGRAM</code>, <code>/SYSTEM/PROGRAM</code> (<code>x86_64</code>, <code>aarch64</code>), \
<code>PROGRAM.sha256</code> and <code>?rev=REVISION</code>.</p>\
<form action=\"/-/search\" method=\"get\"><input name=\"q\" placeholder=\"search programs\" autofocus> \
<button>Search</button></form><p><small>{programs} programs, Nixpkgs revision {rev}.</small></p></body></html>\n",
            h = html_escape(&host),
            ex = example,
            rev = html_escape(&revision),
        );
        return text(StatusCode::OK, TEXT_HTML, body, head);
    }
    let body = format!(
        "binplz: any program from Nixpkgs as one verified static binary.\n\n\
         \x20 curl -fsSL http://{host}/{example} -o {example} && chmod +x {example} && ./{example}\n\n\
         Paths:\n\
         \x20 /PROGRAM                 the program, e.g. /rg\n\
         \x20 /ATTR/PROGRAM            from one attribute, e.g. /ripgrep/rg\n\
         \x20 /SYSTEM/[ATTR/]PROGRAM   for another system: x86_64, aarch64 (or x86_64-linux, ...)\n\
         \x20 /PROGRAM.sha256          its SHA-256, as sha256sum prints it\n\
         \x20 ?rev=REVISION            from an older loaded Nixpkgs revision\n\
         \x20 /-/search?q=WORD         find programs\n\n\
         {programs} programs, Nixpkgs revision {revision}.\n"
    );
    text(StatusCode::OK, TEXT_PLAIN, body, head)
}

pub fn search(
    index: Option<&Index>,
    system: &str,
    query: &str,
    headers: &HeaderMap,
    head: bool,
) -> http::Response<Body> {
    let query = query.trim().to_ascii_lowercase();
    if query.len() > MAX_QUERY {
        return error_status(StatusCode::BAD_REQUEST, "query too long", head);
    }
    let mut results: Vec<(String, String, String)> = Vec::new();
    if let (Some(index), false) = (index, query.is_empty()) {
        // Equal names first, then prefixes, then shorter names; from the names arranged
        // when the index loaded, not a pass over every name.
        for name in index.search(system, &query, MAX_RESULTS) {
            if let Lookup::Found(c) = index.resolve(system, name, None) {
                let chosen = c.chosen();
                results.push((
                    name.to_owned(),
                    chosen.attr.to_owned(),
                    chosen.store_path.to_owned(),
                ));
            }
        }
    }
    if wants(headers, APPLICATION_JSON) {
        let v: Vec<serde_json::Value> = results
            .iter()
            .map(|(p, a, s)| serde_json::json!({"program": p, "attr": a, "store_path": s}))
            .collect();
        return text(
            StatusCode::OK,
            APPLICATION_JSON,
            serde_json::Value::Array(v).to_string() + "\n",
            head,
        );
    }
    let mut body = String::new();
    for (p, a, _) in &results {
        body.push_str(&format!("{p}\t{a}\n"));
    }
    if results.is_empty() {
        body.push_str("no matching programs\n");
    }
    text(StatusCode::OK, TEXT_PLAIN, body, head)
}
