//! Request paths parsed into typed values before any lookup: garbage is a 400, never a scan.
//!
//! The path is percent-decoded once, then split at its (literal) slashes and checked, so
//! `/%74ree` is `/tree` and `/g%2B%2B` is `/g++`. An escape that decodes to `/` or NUL,
//! a malformed escape (`%zz`, a `%` at the end) or decoded bytes that are not UTF-8 are a
//! 400. Query values are decoded the same way, except that `+` is a space there: that is
//! how browsers send a form (the home page's search box); in the path `+` is itself.

use std::borrow::Cow;
use std::fmt;

use crate::index::ProgramName;

/// Longest attribute path accepted (`python313Packages.something-long.dist` is ~60).
const MAX_ATTR: usize = 200;
/// Longest revision accepted (a git SHA-1 is 40, SHA-256 64).
const MAX_REV: usize = 100;

/// A Nix system, normalised from the spellings users type (`uname -m` and Debian names).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct System(String);

impl System {
    /// Accepts `x86_64-linux`, `aarch64-linux` and the other Nix doubles, and the bare
    /// architecture names `x86_64`, `amd64`, `aarch64`, `arm64` (meaning Linux).
    pub fn parse(s: &str) -> Option<System> {
        let full = match s {
            "x86_64" | "amd64" | "x86_64-linux" => "x86_64-linux",
            "aarch64" | "arm64" | "aarch64-linux" => "aarch64-linux",
            "i686-linux" | "armv7l-linux" | "riscv64-linux" | "powerpc64le-linux" => s,
            "x86_64-darwin" | "aarch64-darwin" => s,
            _ => return None,
        };
        Some(System(full.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An attribute path: dot-separated names of `[A-Za-z0-9_+-]`, each not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attr(String);

impl Attr {
    pub fn parse(s: &str) -> Option<Attr> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ATTR
            && s.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_+-'".contains(&b))
            });
        ok.then(|| Attr(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A Nixpkgs revision as given in `?rev=`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Revision(String);

impl Revision {
    pub fn parse(s: &str) -> Option<Revision> {
        let ok = !s.is_empty()
            && s.len() <= MAX_REV
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        ok.then(|| Revision(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a binary request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProgramRequest {
    pub system: Option<System>,
    pub attr: Option<Attr>,
    pub program: ProgramName,
    pub rev: Option<Revision>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Home,
    Health,
    Ready,
    Metrics,
    Search {
        query: String,
    },
    Program(ProgramRequest),
    /// `<program>.sha256`: prints `<sha256>  <program>`.
    Sha256(ProgramRequest),
    /// The Nix binary cache routes (see [`CacheRequest`]).
    Cache(CacheRequest),
}

/// A request of a Nix client using this node as a substituter. Matched by exact shape only,
/// before program routes: anything else under these names is a program or an attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheRequest {
    /// `/nix-cache-info`.
    Info,
    /// `/<32 nix32 characters>.narinfo`.
    NarInfo(HashPart),
    /// `/<32 nix32 characters>.ls`.
    Listing(HashPart),
    /// `/nar/<hash part>-<NarHash in nix32>.nar[.ext]`: this node's own NAR names (see
    /// [`NarName`]).
    Nar(NarName),
    /// `/log/<drv base name>`.
    Log(String),
}

/// A store path's hash part: 32 characters of Nix's base-32 alphabet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HashPart(String);

/// Nix's base-32 alphabet (no `e`, `o`, `t`, `u`).
const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn is_nix32(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| NIX32.contains(&b))
}

impl HashPart {
    pub fn parse(s: &str) -> Option<HashPart> {
        is_nix32(s, 32).then(|| HashPart(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name this node gives a NAR in the narinfos it serves: the store path's hash part
/// (to find the checked narinfo again, which says where the upstream keeps the NAR) and
/// the NarHash it must have (so that a narinfo changed upstream since does not serve
/// another NAR under this name). Nothing in it is trusted: both are checked against the
/// verified narinfo.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NarName {
    pub hash_part: HashPart,
    /// NarHash, nix32 (52 characters).
    pub nar_hash: String,
    /// The extension after `.nar` (`.zst`, `.xz`, or empty).
    pub ext: String,
}

/// Longest extension after `.nar` (`.lzip` is the longest Nix writes).
const MAX_NAR_EXT: usize = 8;

impl NarName {
    pub fn parse(s: &str) -> Option<NarName> {
        let (hash_part, rest) = s.split_once('-')?;
        let hash_part = HashPart::parse(hash_part)?;
        let (nar_hash, ext) = rest.split_once(".nar")?;
        let ext_ok = ext.is_empty()
            || (ext.len() <= MAX_NAR_EXT
                && ext.starts_with('.')
                && ext[1..].bytes().all(|b| b.is_ascii_alphanumeric()));
        (is_nix32(nar_hash, 52) && ext_ok).then(|| NarName {
            hash_part,
            nar_hash: nar_hash.to_owned(),
            ext: ext.to_owned(),
        })
    }
}

impl fmt::Display for NarName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}.nar{}", self.hash_part.0, self.nar_hash, self.ext)
    }
}

/// Longest derivation base name accepted in `/log/…` (a store path name is at most 211).
const MAX_DRV_NAME: usize = 211;

/// The Nix binary cache route `segments` name, by exact shape; `None` for anything else.
fn cache_route(segments: &[&str]) -> Option<CacheRequest> {
    match segments {
        ["nix-cache-info"] => Some(CacheRequest::Info),
        [one] => {
            if let Some(h) = one.strip_suffix(".narinfo") {
                HashPart::parse(h).map(CacheRequest::NarInfo)
            } else {
                one.strip_suffix(".ls")
                    .and_then(HashPart::parse)
                    .map(CacheRequest::Listing)
            }
        }
        ["nar", name] => NarName::parse(name).map(CacheRequest::Nar),
        ["log", drv] => {
            let (hash, name) = drv.split_once('-')?;
            let ok = HashPart::parse(hash).is_some()
                && drv.len() <= MAX_DRV_NAME
                && name.len() > ".drv".len()
                && name.ends_with(".drv")
                // A store path name may hold `?`, but in an upstream path it would start
                // a query: the fetch would name another object than the one cached.
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-._=".contains(&b));
            ok.then(|| CacheRequest::Log((*drv).to_owned()))
        }
        _ => None,
    }
}

/// Why a path is not a valid request. The text is safe to show (no request bytes in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such page")]
    NotFound,
    #[error("{0}")]
    BadRequest(&'static str),
}

/// Most query length looked at.
const MAX_QUERY: usize = 1024;

/// Parses a request target's path and query.
pub fn parse(path: &str, query: Option<&str>) -> Result<Route, RouteError> {
    if query.is_some_and(|q| q.len() > MAX_QUERY) {
        return Err(RouteError::BadRequest("query string too long"));
    }
    let path = percent_decode(path, Plus::Itself).map_err(|e| match e {
        DecodeError::Malformed => RouteError::BadRequest("malformed percent-encoding in the path"),
        DecodeError::SlashOrNul => RouteError::BadRequest("an encoded / or NUL in the path"),
        DecodeError::NotUtf8 => RouteError::BadRequest("the path is not UTF-8"),
    })?;
    let segments: Vec<&str> = path
        .strip_prefix('/')
        .ok_or(RouteError::BadRequest("path must start with /"))?
        .split('/')
        .collect();
    match segments.as_slice() {
        [""] => return Ok(Route::Home),
        ["-", "healthz"] => return Ok(Route::Health),
        ["-", "readyz"] => return Ok(Route::Ready),
        ["-", "metrics"] => return Ok(Route::Metrics),
        ["-", "search"] => {
            let q = query_param(query, "q")?.unwrap_or_default();
            return Ok(Route::Search { query: q });
        }
        ["-", ..] => return Err(RouteError::NotFound),
        _ => {}
    }
    if let Some(c) = cache_route(&segments) {
        return Ok(Route::Cache(c));
    }
    let rev = match query_param(query, "rev")? {
        Some(r) => Some(Revision::parse(&r).ok_or(RouteError::BadRequest("invalid revision"))?),
        None => None,
    };
    let (system, attr, last) = match segments.as_slice() {
        [p] => (None, None, *p),
        [a, p] => match System::parse(a) {
            Some(s) => (Some(s), None, *p),
            None => (None, Some(parse_attr(a)?), *p),
        },
        [s, a, p] => (
            Some(System::parse(s).ok_or(RouteError::BadRequest("unknown system"))?),
            Some(parse_attr(a)?),
            *p,
        ),
        _ => {
            return Err(RouteError::BadRequest(
                "expected /PROGRAM, /ATTR/PROGRAM or /SYSTEM/ATTR/PROGRAM",
            ))
        }
    };
    let (name, sha) = match last.strip_suffix(".sha256") {
        Some(n) => (n, true),
        None => (last, false),
    };
    let program = ProgramName::parse(name).ok_or(RouteError::BadRequest("invalid program name"))?;
    let req = ProgramRequest {
        system,
        attr,
        program,
        rev,
    };
    Ok(if sha {
        Route::Sha256(req)
    } else {
        Route::Program(req)
    })
}

fn parse_attr(s: &str) -> Result<Attr, RouteError> {
    Attr::parse(s).ok_or(RouteError::BadRequest("invalid attribute name"))
}

/// The value of `key` in a query string, percent-decoded (`+` is a space). Every pair is
/// decoded, so a malformed one anywhere is an error, not only in the value looked for.
fn query_param(query: Option<&str>, key: &str) -> Result<Option<String>, RouteError> {
    let Some(query) = query else { return Ok(None) };
    let decode = |s| {
        percent_decode(s, Plus::Space).map_err(|_| RouteError::BadRequest("malformed query string"))
    };
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if found.is_none() && k == key {
            found = Some(v.into_owned());
        }
    }
    Ok(found)
}

/// What `+` means where a string is decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plus {
    /// In a path: itself (`/g++`).
    Itself,
    /// In a query: a space, as in a submitted form.
    Space,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeError {
    /// `%` not followed by two hex digits.
    Malformed,
    /// An escape for `/` or NUL: a name cannot hold either, and a decoded `/` would
    /// become a separator.
    SlashOrNul,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

/// Decodes `%XX` escapes once (a decoded `%` starts no new escape). Borrows when there is
/// nothing to decode, which is almost always.
fn percent_decode(s: &str, plus: Plus) -> Result<Cow<'_, str>, DecodeError> {
    let escaped = s.contains('%') || (plus == Plus::Space && s.contains('+'));
    if !escaped {
        return if s.contains('\0') {
            Err(DecodeError::SlashOrNul)
        } else {
            Ok(Cow::Borrowed(s))
        };
    }
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' if plus == Plus::Space => out.push(b' '),
            b'%' => {
                let hi = bytes.next().and_then(hex).ok_or(DecodeError::Malformed)?;
                let lo = bytes.next().and_then(hex).ok_or(DecodeError::Malformed)?;
                let byte = hi << 4 | lo;
                let slash = byte == b'/' && plus == Plus::Itself;
                if slash || byte == 0 {
                    return Err(DecodeError::SlashOrNul);
                }
                out.push(byte);
            }
            0 => return Err(DecodeError::SlashOrNul),
            b => out.push(b),
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| DecodeError::NotUtf8)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(system: Option<&str>, attr: Option<&str>, program: &str) -> ProgramRequest {
        ProgramRequest {
            system: system.map(|s| System(s.into())),
            attr: attr.map(|a| Attr(a.into())),
            program: ProgramName::parse(program).expect("valid"),
            rev: None,
        }
    }

    #[test]
    fn program_routes_parse_into_typed_values() {
        assert_eq!(
            parse("/tree", None),
            Ok(Route::Program(prog(None, None, "tree")))
        );
        assert_eq!(
            parse("/python3Packages.black/black", None),
            Ok(Route::Program(prog(
                None,
                Some("python3Packages.black"),
                "black"
            )))
        );
        assert_eq!(
            parse("/arm64/tree", None),
            Ok(Route::Program(prog(Some("aarch64-linux"), None, "tree")))
        );
        assert_eq!(
            parse("/amd64/tree/tree", None),
            Ok(Route::Program(prog(
                Some("x86_64-linux"),
                Some("tree"),
                "tree"
            )))
        );
        assert_eq!(
            parse("/x86_64-linux/rg", None),
            Ok(Route::Program(prog(Some("x86_64-linux"), None, "rg")))
        );
        assert_eq!(
            parse("/rg.sha256", None),
            Ok(Route::Sha256(prog(None, None, "rg")))
        );
        let Ok(Route::Program(r)) = parse("/tree", Some("rev=abc123")) else {
            panic!("rev")
        };
        assert_eq!(r.rev.map(|r| r.0), Some("abc123".into()));
    }

    #[test]
    fn cache_routes_match_exact_shapes_only_and_programs_keep_the_rest() {
        let h = "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d";
        let nar_hash = "16830sa6819cpafyk4h05mzzk6fmbmzvvhsdpk9a0hdgari9dssk";
        let cache = |p: &str| match parse(p, None) {
            Ok(Route::Cache(c)) => c,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(cache("/nix-cache-info"), CacheRequest::Info);
        assert_eq!(
            cache(&format!("/{h}.narinfo")),
            CacheRequest::NarInfo(HashPart(h.into()))
        );
        assert_eq!(
            cache(&format!("/{h}.ls")),
            CacheRequest::Listing(HashPart(h.into()))
        );
        let name = format!("{h}-{nar_hash}.nar.zst");
        match cache(&format!("/nar/{name}")) {
            CacheRequest::Nar(n) => assert_eq!(n.to_string(), name),
            other => panic!("{other:?}"),
        }
        let drv = format!("{h}-hello-1.0.drv");
        assert_eq!(cache(&format!("/log/{drv}")), CacheRequest::Log(drv));
        // Near misses are programs (or attribute and program), as they always were.
        for (p, want) in [
            ("/nar", prog(None, None, "nar")),
            ("/log", prog(None, None, "log")),
            ("/nar/tree", prog(None, Some("nar"), "tree")),
            ("/log/tree", prog(None, Some("log"), "tree")),
            (
                "/x86_64-linux/nix-cache-info",
                prog(Some("x86_64-linux"), None, "nix-cache-info"),
            ),
            ("/nix-cache-info/x", prog(None, Some("nix-cache-info"), "x")),
        ] {
            assert_eq!(parse(p, None), Ok(Route::Program(want)), "{p}");
        }
        for p in [
            // A hash of the wrong length or alphabet (`e`, `o`, `t`, `u` are not nix32).
            format!("/{}.narinfo", &h[..31]),
            format!("/{}e.narinfo", &h[..31]),
            format!("/nar/{h}-{}.nar", &nar_hash[..51]),
            format!("/nar/{h}.nar"),
            format!("/nar/{h}-{nar_hash}.nar.zst/x"),
            format!("/log/{h}-hello"),
        ] {
            assert!(!matches!(parse(&p, None), Ok(Route::Cache(_))), "{p}");
        }
    }

    #[test]
    fn service_routes_parse() {
        assert_eq!(parse("/", None), Ok(Route::Home));
        assert_eq!(parse("/-/healthz", None), Ok(Route::Health));
        assert_eq!(
            parse("/-/search", Some("q=ri+p%67")),
            Ok(Route::Search {
                query: "ri pg".into()
            })
        );
        assert_eq!(parse("/-/nope", None), Err(RouteError::NotFound));
    }

    #[test]
    fn hostile_paths_are_bad_requests() {
        for p in [
            "/x;reboot",
            "/$(id)",
            "/..",
            "/a/b/c/d",
            "/%2e%2e/etc",
            "/.hidden",
            "/-rf",
            "//",
            "/a//b",
            "/tree/",
            "/bad%20name",
            "/unknown-os/attr/tree",
            "/a b",
        ] {
            assert!(
                matches!(parse(p, None), Err(RouteError::BadRequest(_))),
                "{p}"
            );
        }
        assert!(matches!(
            parse("/tree", Some("rev=../../x")),
            Err(RouteError::BadRequest(_))
        ));
        assert!(matches!(
            parse("/-/search", Some("q=%zz")),
            Err(RouteError::BadRequest(_))
        ));
    }
    #[test]
    fn percent_encoded_names_are_decoded_once() {
        for (path, want) in [
            ("/%74ree", prog(None, None, "tree")),
            ("/g%2B%2B", prog(None, None, "g++")),
            ("/g%2b%2b", prog(None, None, "g++")),
            ("/g++", prog(None, None, "g++")),
            (
                "/%61md64/python3Packages%2Eblack/bl%61ck",
                prog(Some("x86_64-linux"), Some("python3Packages.black"), "black"),
            ),
        ] {
            assert_eq!(parse(path, None), Ok(Route::Program(want)), "{path}");
        }
        assert_eq!(parse("/%2D/healthz", None), Ok(Route::Health));
    }

    #[rstest::rstest]
    #[case::an_encoded_slash("/a%2Fb", "an encoded / or NUL in the path")]
    #[case::an_encoded_slash_in_lower_case("/tree%2f", "an encoded / or NUL in the path")]
    #[case::an_encoded_nul("/tree%00", "an encoded / or NUL in the path")]
    #[case::dot_dot("/%2e%2e", "invalid program name")]
    #[case::dot_dot_then_more("/%2E%2E/tree", "invalid attribute name")]
    #[case::an_escape_escaped("/%2574ree", "invalid program name")]
    #[case::a_bad_escape("/%zz", "malformed percent-encoding in the path")]
    #[case::half_an_escape("/tree%7", "malformed percent-encoding in the path")]
    #[case::a_percent_at_the_end("/tree%", "malformed percent-encoding in the path")]
    #[case::a_sign_in_an_escape("/%+1tree", "malformed percent-encoding in the path")]
    #[case::not_utf8("/%ff", "the path is not UTF-8")]
    #[case::utf8_not_a_name("/%C3%A9", "invalid program name")]
    #[case::a_space("/bad%20name", "invalid program name")]
    fn encoded_bytes_a_name_cannot_hold_are_still_refused(
        #[case] path: &str,
        #[case] why: &'static str,
    ) {
        assert_eq!(
            parse(path, None),
            Err(RouteError::BadRequest(why)),
            "{path}"
        );
    }

    #[test]
    fn query_values_are_decoded_with_plus_as_a_space() {
        let search = |q| parse("/-/search", Some(q));
        let query = |s: &str| Ok(Route::Search { query: s.into() });
        assert_eq!(search("q=a+b"), query("a b"));
        assert_eq!(search("q=a%2Bb"), query("a+b"));
        assert_eq!(search("q=a%2Fb"), query("a/b"));
        assert_eq!(search("other=1&q=%72g"), query("rg"));
        assert_eq!(search("%71=rg"), query("rg"));
        let Ok(Route::Program(r)) = parse("/tree", Some("rev=fix%74ure")) else {
            panic!("rev")
        };
        assert_eq!(r.rev.map(|r| r.0), Some("fixture".into()));
        for q in ["q=%", "q=%zz", "q=%ff", "q=a%00", "x=%zz&q=rg", "q=rg&x=%4"] {
            assert_eq!(
                search(q),
                Err(RouteError::BadRequest("malformed query string")),
                "{q}"
            );
        }
        assert!(matches!(
            parse("/tree", Some("rev=%zz")),
            Err(RouteError::BadRequest(_))
        ));
    }
}
