//! `binplz index build`, `show` and `stats`: the index built from the fixture evaluations
//! against a fake binary cache, the rules that pick a default among several providers,
//! `.ls` listings checked against the signed NAR, upstream faults, bad evaluation input,
//! the index file on disk, and the command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use binplz::error::ErrorKind;
use binplz::extract::Extractor;
use binplz::index::build::{self, BuildError, BuildOptions, Built, EvalInput};
use binplz::index::format::{self, Found, DEFAULT_MAX_INDEX_SIZE};
use binplz::index::{Candidate, Index, IndexError, Lookup};
use binplz::nar::writer::Entry;
use binplz::narinfo::Trust;
use binplz::upstream::{self, Cache, ClientConfig};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::cli::{assert_failure, assert_success, binplz, run, stderr};
use crate::support::{
    self, dir_entries, drv_paths, fixture_nar_path, fixture_narinfo, narinfo_path, paths,
    FakeUpstream, Fault, Key, Published,
};

const SYSTEM: &str = "x86_64-linux";
const REVISION: &str = "r1";

/// Further attempts after a 5xx (the default is 3, with longer backoff).
const RETRIES: u32 = 2;

/// Short backoff, so fault tests stay fast; timeouts are never what a test waits for.
fn client_config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(5),
        first_byte_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        retries: RETRIES,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(10),
    }
}

/// An extractor over `up` trusting the test key, as `binplz index build` makes one.
fn extractor(up: &FakeUpstream) -> Extractor {
    let cache = upstream::open(&up.url(), &client_config())
        .map(Cache::new)
        .expect("the fake upstream's URL opens");
    let trust = Trust::new(&[Key::test().public()], true).expect("the test key parses");
    Extractor::new(vec![cache], trust, true)
}

fn cache() -> FakeUpstream {
    FakeUpstream::serve(support::cache_dir("cache"))
}

fn eval_fixture(name: &str) -> PathBuf {
    support::fixtures().join("eval").join(name)
}

fn jobs_fixture() -> PathBuf {
    eval_fixture("nix-eval-jobs.jsonl")
}

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

/// Writes `text` to `name` in `dir`.
fn write_file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

async fn try_build(up: &FakeUpstream, evals: &[PathBuf]) -> Result<Built, BuildError> {
    let opts = BuildOptions {
        evals: evals.iter().cloned().map(EvalInput::File).collect(),
        revision: Some(REVISION.into()),
        jobs: 4,
        progress: false,
    };
    build::build(extractor(up), vec![up.url()], opts).await
}

async fn build(up: &FakeUpstream, evals: &[PathBuf]) -> Built {
    match try_build(up, evals).await {
        Ok(b) => b,
        Err(e) => panic!("building the index: {e} ({e:?})"),
    }
}

/// The index exactly as `binplz index build` would write it, loaded back in memory.
fn index_of(built: &Built) -> Index {
    format::to_index(
        &built.meta,
        &built.programs,
        &built.not_built,
        &built.failures,
    )
    .expect("the built index encodes and loads")
}

/// One candidate, as compared between builds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    attr: String,
    output: String,
    output_path: String,
    store_path: String,
    path: String,
    size: u64,
    nar_offset: Option<u64>,
    drv_path: Option<String>,
}

impl From<&Candidate> for Row {
    fn from(c: &Candidate) -> Row {
        Row {
            attr: c.attr.clone(),
            output: c.output.clone(),
            output_path: c.output_path.clone(),
            store_path: c.store_path.clone(),
            path: c.path.clone(),
            size: c.size,
            nar_offset: c.nar_offset,
            drv_path: c.drv_path.clone(),
        }
    }
}

/// Every `(system, program)` of a build with its candidates, best first.
fn programs_of(built: &Built) -> BTreeMap<(String, String), Vec<Row>> {
    built
        .programs
        .iter()
        .map(|p| {
            let rows = p.candidates.iter().map(Row::from).collect();
            ((p.system.clone(), p.program.clone()), rows)
        })
        .collect()
}

fn program_names(built: &Built) -> Vec<String> {
    built.programs.iter().map(|p| p.program.clone()).collect()
}

/// The chosen candidate of `program` (from `attr`, when given); panics unless found.
fn found<'a>(index: &'a Index, program: &str, attr: Option<&str>) -> Vec<Found<'a>> {
    match index.resolve(SYSTEM, program, attr) {
        Lookup::Found(c) => c.iter().collect(),
        other => panic!("{program} (attr {attr:?}): expected a candidate, got {other:?}"),
    }
}

fn attrs(found: &[Found<'_>]) -> Vec<String> {
    found.iter().map(|f| f.attr.to_owned()).collect()
}

/// `(store_path, path)` of the chosen candidate.
fn location(index: &Index, program: &str) -> (String, String) {
    let f = &found(index, program, None)[0];
    (f.store_path.to_owned(), f.path.to_owned())
}

/// The programs of the fixture package set, as the fixtures README describes them.
const FIXTURE_PROGRAMS: [&str; 11] = [
    "binlink-tool",
    "dyn",
    "dyn-store",
    "goodbye",
    "hello",
    "hello-abs",
    "hello-rel",
    "hello-up",
    "multi-tool",
    "portable-script",
    "store-script",
];

/// Every `.ls` file of the fixture cache, as cache paths.
fn fixture_listings() -> Vec<String> {
    let names: Vec<String> = dir_entries(&support::cache_dir("cache"))
        .into_iter()
        .filter(|n| n.ends_with(".ls"))
        .collect();
    assert!(
        names.len() >= 10,
        "the fixture cache has listings: {names:?}"
    );
    names
}

fn ls_path(store_path: &str) -> String {
    format!("{}.ls", support::hash_part(store_path))
}

// ─── The fixture package set ───────────────────────────────────────────────────────────

#[tokio::test]
async fn both_evaluation_formats_give_the_same_index() {
    let up = cache();
    let jobs = build(&up, &[jobs_fixture()]).await;
    let env = build(&up, &[eval_fixture("nix-env-meta.json")]).await;
    assert_eq!(program_names(&jobs), FIXTURE_PROGRAMS);
    assert_eq!(programs_of(&jobs), programs_of(&env));
    assert_eq!(jobs.not_built, env.not_built);
    assert!(jobs.warnings.is_empty(), "{:?}", jobs.warnings);
    assert!(env.warnings.is_empty(), "{:?}", env.warnings);
    // Only the JSON lines carry the evaluation error (nix-env aborts on it instead).
    assert_eq!(jobs.summary.eval_failures, 1);
    assert_eq!(env.summary.eval_failures, 0);
}

#[tokio::test]
async fn hello_defaults_to_its_own_attribute_then_main_program_then_shortest() {
    let up = cache();
    let index = index_of(&build(&up, &[jobs_fixture()]).await);
    let all = found(&index, "hello", None);
    assert_eq!(
        attrs(&all),
        ["hello", "hello-too", "links", "nonexec", "tree-dup"]
    );
    assert_eq!(all[0].output, "out");
    assert_eq!(all[0].store_path, paths::HELLO);
    assert_eq!(all[0].path, "bin/hello");
    assert_eq!(all[0].size, support::prebuilt("hello").len() as u64);
    assert!(all[0].executable);
    assert_eq!(all[1].main_program, Some("hello"));

    let too = found(&index, "hello", Some("hello-too"));
    assert_eq!(too[0].attr, "hello-too");
    assert!(too[0].store_path.ends_with("-hello-too-2.0"), "{too:?}");
    assert_eq!(too[0].path, "bin/hello");
    // The requested attribute first, then the others in their usual order.
    assert_eq!(
        attrs(&too),
        ["hello-too", "hello", "links", "nonexec", "tree-dup"]
    );
    assert_eq!(
        index.resolve(SYSTEM, "hello", Some("goodbye")),
        Lookup::Unknown
    );
}

#[tokio::test]
async fn program_of_a_multi_output_package_comes_from_its_bin_output() {
    let up = cache();
    let index = index_of(&build(&up, &[jobs_fixture()]).await);
    let multi = found(&index, "multi-tool", None);
    assert_eq!(multi.len(), 1, "{multi:?}");
    assert_eq!(multi[0].attr, "multi");
    assert_eq!(multi[0].output, "bin");
    assert_eq!(multi[0].output_path, paths::MULTI_BIN);
    assert_eq!(multi[0].store_path, paths::MULTI_BIN);
    assert_eq!(multi[0].path, "bin/multi-tool");
}

#[tokio::test]
async fn symlinks_in_bin_are_resolved_to_the_file_they_lead_to() {
    let up = cache();
    let index = index_of(&build(&up, &[jobs_fixture()]).await);
    let at = |sp: &str, p: &str| (sp.to_owned(), p.to_owned());
    assert_eq!(
        location(&index, "binlink-tool"),
        at(paths::BINLINK, "libexec/binlink-tool")
    );
    assert_eq!(
        location(&index, "hello-up"),
        at(paths::LINKS, "libexec/real-hello")
    );
    assert_eq!(location(&index, "hello-rel"), at(paths::LINKS, "bin/hello"));
    // Into a signed reference: the file lives in hello's store path.
    let abs = &found(&index, "hello-abs", None)[0];
    assert_eq!(
        (abs.attr, abs.output_path, abs.store_path, abs.path),
        ("links", paths::LINKS, paths::HELLO, "bin/hello")
    );
}

/// An evaluation of `links` alone: `hello`'s store path is then only a reference.
fn links_alone(dir: &TempDir) -> PathBuf {
    let all = read_text(&jobs_fixture());
    let line = all
        .lines()
        .find(|l| l.starts_with(r#"{"attr":"links","#))
        .expect("links is in the evaluation");
    write_file(dir, "links.jsonl", &format!("{line}\n"))
}

#[tokio::test]
async fn a_reference_the_upstream_fails_once_is_fetched_again() {
    let up = cache();
    let dir = tempdir();
    // Two answers of 500: both tries of the client's first attempt.
    up.set_fault(
        &narinfo_path(paths::HELLO),
        Fault::Status {
            code: 500,
            first: Some(2),
            retry_after: None,
        },
    );
    let built = build(&up, &[links_alone(&dir)]).await;
    let index = index_of(&built);
    assert_eq!(found(&index, "hello-abs", None)[0].store_path, paths::HELLO);
    assert_eq!((built.summary.failures, built.summary.failed_links), (0, 0));
}

#[tokio::test]
async fn a_reference_missing_upstream_leaves_its_program_out_and_is_counted() {
    let up = cache();
    let dir = tempdir();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::NotFound);
    let built = build(&up, &[links_alone(&dir)]).await;
    let index = index_of(&built);
    assert_eq!(index.resolve(SYSTEM, "hello-abs", None), Lookup::Unknown);
    // The output's other programs are indexed.
    assert_eq!(
        location(&index, "hello-rel"),
        (paths::LINKS.to_owned(), "bin/hello".to_owned())
    );
    assert_eq!((built.summary.failures, built.summary.failed_links), (0, 1));
}

#[rstest]
#[case::non_executable("readme")]
#[case::escaping_the_store_path("escape")]
#[case::absolute_outside_the_store("etc-passwd")]
#[case::loop_start("loop-a")]
#[case::loop_end("loop-b")]
#[case::dangling("dangling")]
#[case::into_a_path_that_is_not_a_reference("unref")]
#[case::to_a_directory("dir-link")]
#[tokio::test]
async fn entries_that_are_not_executable_files_are_not_indexed(#[case] name: &str) {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let index = index_of(&built);
    assert_eq!(index.resolve(SYSTEM, name, None), Lookup::Unknown);
    assert!(!program_names(&built).iter().any(|p| p == name));
}

#[tokio::test]
async fn dotfiles_in_bin_are_not_indexed() {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    assert!(
        !program_names(&built).iter().any(|p| p.starts_with('.')),
        "{:?}",
        program_names(&built)
    );
    // tree-dup still provides its hello.
    let index = index_of(&built);
    assert!(attrs(&found(&index, "hello", None)).contains(&"tree-dup".to_owned()));
}

#[tokio::test]
async fn output_in_no_cache_is_not_built() {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let index = index_of(&built);
    assert_eq!(
        index.resolve(SYSTEM, "notbuilt", None),
        Lookup::NotBuilt {
            attr: "notbuilt",
            store_path: paths::NOTBUILT,
            drv_path: Some(drv_paths::NOTBUILT),
        }
    );
    assert_eq!(built.summary.not_built, 1);
    assert_eq!(built.meta.not_built, 1);
}

#[tokio::test]
async fn evaluation_error_is_recorded_and_counted() {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let index = index_of(&built);
    let failures: Vec<_> = index.failures().collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].attr, "broken");
    assert!(
        failures[0].message.contains("attribute 'nope' missing"),
        "{failures:?}"
    );
    assert_eq!(built.summary.eval_failures, 1);
    assert_eq!(built.summary.failures, 0);
    assert_eq!(built.meta.failures, 1);
    assert_eq!(index.resolve(SYSTEM, "broken", None), Lookup::Unknown);
}

#[tokio::test]
async fn summary_and_metadata_count_what_was_indexed() {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let s = &built.summary;
    // 11 attributes; multi has two outputs.
    assert_eq!((s.attributes, s.outputs), (11, 12));
    assert_eq!(s.programs, FIXTURE_PROGRAMS.len());
    assert_eq!((s.not_built, s.failures, s.eval_failures), (1, 0, 1));
    assert_eq!(s.bad_lines, 0);
    // Every output in the cache came with a listing that agrees with its NarSize.
    assert_eq!(
        (s.from_listing, s.from_nar, s.listings_rejected),
        (11, 0, 0)
    );
    // links: escape, etc-passwd, loop-a, loop-b, dangling, unref, dir-link; nonexec: readme.
    assert_eq!(s.skipped_links, 8);
    assert_eq!(s.failed_links, 0);

    let m = &built.meta;
    assert_eq!(m.revision.as_deref(), Some(REVISION));
    assert_eq!(m.systems, [SYSTEM]);
    assert_eq!(m.upstreams, [up.url()]);
    assert_eq!((m.attributes, m.outputs, m.programs), (11, 12, 11));
    assert_eq!((m.not_built, m.failures), (1, 1));
    assert!(m.created > 0);
    let index = index_of(&built);
    assert_eq!(index.metadata(), m);
    // Built programs and the not-built one.
    assert_eq!(index.len(), FIXTURE_PROGRAMS.len() + 1);
}

#[rstest]
#[case::missing_letter("helo", "hello")]
#[case::extra_letter("helloo", "hello")]
#[case::swapped_letters("goodbey", "goodbye")]
#[case::prefix("multi", "multi-tool")]
#[tokio::test]
async fn unknown_names_get_close_suggestions(#[case] typed: &str, #[case] meant: &str) {
    let up = cache();
    let index = index_of(&build(&up, &[jobs_fixture()]).await);
    assert_eq!(index.resolve(SYSTEM, typed, None), Lookup::Unknown);
    let suggestions = index.suggest(SYSTEM, typed);
    assert_eq!(
        suggestions.first().map(String::as_str),
        Some(meant),
        "{suggestions:?}"
    );
    assert!(suggestions.len() <= 5);
    assert!(index.suggest(SYSTEM, "zzzzzzzzzz").is_empty());
}

// ─── Choosing the default ──────────────────────────────────────────────────────────────

/// One attribute of a synthetic evaluation.
struct Attr<'a> {
    attr: &'a str,
    main_program: Option<&'a str>,
    /// Output name → published store path.
    outputs: Vec<(&'a str, &'a Published)>,
}

/// A nix-eval-jobs line for `a`.
fn job_line(a: &Attr<'_>) -> String {
    let outputs: serde_json::Map<String, serde_json::Value> = a
        .outputs
        .iter()
        .map(|(name, p)| ((*name).to_owned(), p.store_path.clone().into()))
        .collect();
    let mut meta = serde_json::Map::new();
    if let Some(m) = a.main_program {
        meta.insert("mainProgram".into(), m.into());
    }
    serde_json::json!({
        "attr": a.attr,
        "attrPath": a.attr.split('.').collect::<Vec<_>>(),
        "meta": meta,
        "outputs": outputs,
        "system": SYSTEM,
    })
    .to_string()
}

fn jobs_file(dir: &TempDir, attrs: &[Attr<'_>]) -> PathBuf {
    let text: String = attrs.iter().map(|a| job_line(a) + "\n").collect();
    write_file(dir, "eval.jsonl", &text)
}

/// A store path with `bin/<program>` (its contents name the store path, so every one
/// differs).
fn publish_program(up: &FakeUpstream, name: &str, program: &str) -> Published {
    let tree = Entry::dir([(
        "bin",
        Entry::dir([(
            program,
            Entry::executable(format!("#!/bin/sh\necho {name}\n")),
        )]),
    )]);
    support::publish_tree(up, name, &tree)
}

#[tokio::test]
async fn default_is_own_attribute_then_main_program_then_shortest_path_then_name() {
    let up = FakeUpstream::empty();
    let names = ["tool", "provider", "zz", "aaa", "abc", "a.b", "pkgs.tool"];
    let published: Vec<Published> = names
        .iter()
        .map(|n| publish_program(&up, &format!("{}-1.0", n.replace('.', "-")), "tool"))
        .collect();
    let attr = |i: usize, main: Option<&'static str>| Attr {
        attr: names[i],
        main_program: main,
        outputs: vec![("out", &published[i])],
    };
    // In an order that is none of the rules'.
    let evaluation = [
        attr(6, None),
        attr(5, None),
        attr(4, None),
        attr(3, None),
        attr(2, None),
        attr(1, Some("tool")),
        attr(0, None),
    ];
    let dir = tempdir();
    let built = build(&up, &[jobs_file(&dir, &evaluation)]).await;
    let index = index_of(&built);
    // Fewer attribute path components first, then the shorter name, then by name.
    assert_eq!(
        attrs(&found(&index, "tool", None)),
        ["tool", "provider", "zz", "aaa", "abc", "a.b", "pkgs.tool"]
    );
    assert_eq!(
        found(&index, "tool", None)[0].store_path,
        published[0].store_path
    );

    // Without the program's own attribute, its declared main program wins.
    let dir = tempdir();
    let built = build(&up, &[jobs_file(&dir, &evaluation[..6])]).await;
    let index = index_of(&built);
    assert_eq!(found(&index, "tool", None)[0].attr, "provider");
}

#[tokio::test]
async fn bin_output_is_preferred_over_out_and_out_over_others() {
    let up = FakeUpstream::empty();
    let split_out = publish_program(&up, "split-1.0", "tool");
    let split_bin = publish_program(&up, "split-1.0-bin", "tool");
    let other_dev = publish_program(&up, "other-1.0-dev", "tool2");
    let other_out = publish_program(&up, "other-1.0", "tool2");
    let evaluation = [
        Attr {
            attr: "split",
            main_program: None,
            outputs: vec![("out", &split_out), ("bin", &split_bin)],
        },
        Attr {
            attr: "other",
            main_program: None,
            outputs: vec![("dev", &other_dev), ("out", &other_out)],
        },
    ];
    let dir = tempdir();
    let built = build(&up, &[jobs_file(&dir, &evaluation)]).await;
    let index = index_of(&built);
    // One candidate per attribute: its preferred output.
    let tool = found(&index, "tool", None);
    assert_eq!(tool.len(), 1, "{tool:?}");
    assert_eq!(
        (tool[0].output, tool[0].store_path),
        ("bin", split_bin.store_path.as_str())
    );
    let tool2 = found(&index, "tool2", None);
    assert_eq!(tool2.len(), 1, "{tool2:?}");
    assert_eq!(
        (tool2[0].output, tool2[0].store_path),
        ("out", other_out.store_path.as_str())
    );
    assert_eq!(built.summary.outputs, 4);
}

#[tokio::test]
async fn not_built_program_names_the_attribute_the_default_rules_would_pick() {
    let up = FakeUpstream::empty();
    let kit = publish_program(&up, "kit-1.0", "tool");
    let line = |attr: &str, main: Option<&str>| {
        let store_path = support::synthetic_store_path(&format!("{attr}-1.0")).to_absolute_path();
        let mut meta = serde_json::Map::new();
        if let Some(m) = main {
            meta.insert("mainProgram".into(), m.into());
        }
        serde_json::json!({
            "attr": attr, "attrPath": [attr], "meta": meta,
            "outputs": {"out": store_path}, "system": SYSTEM,
        })
        .to_string()
            + "\n"
    };
    let dir = tempdir();
    let mut text = line("greet", None) + &line("hi", Some("greet")) + &line("tool", None);
    text += &job_line(&Attr {
        attr: "kit",
        main_program: None,
        outputs: vec![("out", &kit)],
    });
    let built = build(&up, &[write_file(&dir, "eval.jsonl", &text)]).await;
    assert_eq!(built.summary.not_built, 3);
    let index = index_of(&built);
    // `hi` is shorter, but `greet` is the program's own attribute.
    let greet_path = support::synthetic_store_path("greet-1.0").to_absolute_path();
    assert_eq!(
        index.resolve(SYSTEM, "greet", None),
        Lookup::NotBuilt {
            attr: "greet",
            store_path: &greet_path,
            drv_path: None,
        }
    );
    let hi_path = support::synthetic_store_path("hi-1.0").to_absolute_path();
    assert_eq!(
        index.resolve(SYSTEM, "hi", None),
        Lookup::NotBuilt {
            attr: "hi",
            store_path: &hi_path,
            drv_path: None,
        }
    );
    // What is built wins over what is not.
    assert_eq!(found(&index, "tool", None)[0].attr, "kit");
}

fn candidate(attr: &str, output: &str, main_program: Option<&str>) -> Candidate {
    Candidate {
        attr: attr.into(),
        attr_path_len: attr.split('.').count() as u32,
        main_program: main_program.map(Into::into),
        output: output.into(),
        output_path: format!("/nix/store/{}-{attr}-{output}", "0".repeat(32)),
        store_path: format!("/nix/store/{}-{attr}-{output}", "0".repeat(32)),
        path: "bin/tool".into(),
        size: 1,
        executable: true,
        sha256: None,
        nar_offset: None,
        drv_path: None,
    }
}

#[test]
fn candidate_rank_orders_by_the_default_choice_rules() {
    let best_first = [
        candidate("tool", "bin", None),
        candidate("tool", "out", None),
        candidate("tool", "lib", None),
        candidate("provider", "out", Some("tool")),
        candidate("zz", "bin", None),
        candidate("zz", "out", None),
        candidate("aaa", "out", None),
        candidate("abc", "out", Some("other")),
        candidate("a.b", "out", None),
        candidate("python3Packages.tool", "out", None),
    ];
    // Every rotation and the reverse sort back into the same order.
    let mut orders: Vec<Vec<Candidate>> = (0..best_first.len())
        .map(|k| {
            let mut v = best_first.to_vec();
            v.rotate_left(k);
            v
        })
        .collect();
    orders.push(best_first.iter().rev().cloned().collect());
    for mut v in orders {
        v.sort_by(|a, b| a.rank("tool").cmp(&b.rank("tool")));
        assert_eq!(v, best_first);
    }
}

// ─── Listings ──────────────────────────────────────────────────────────────────────────

/// links' real listing, edited.
fn lying_listing(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let path = support::cache_dir("cache").join(ls_path(paths::LINKS));
    let mut v: serde_json::Value =
        serde_json::from_str(&read_text(&path)).expect("the fixture listing is JSON");
    edit(&mut v);
    serde_json::to_vec(&v).expect("JSON")
}

fn links_bin(v: &mut serde_json::Value) -> &mut serde_json::Value {
    &mut v["root"]["entries"]["bin"]["entries"]
}

#[rstest]
#[case::extra_program(|v: &mut serde_json::Value| {
    links_bin(v)["evil"] = serde_json::json!({"type": "regular", "size": 64, "executable": true});
})]
#[case::wrong_offset(|v: &mut serde_json::Value| {
    links_bin(v)["hello"]["narOffset"] = 1224.into();
})]
#[case::wrong_size(|v: &mut serde_json::Value| {
    links_bin(v)["hello"]["size"] = 64.into();
})]
#[case::symlink_made_executable_file(|v: &mut serde_json::Value| {
    links_bin(v)["loop-a"] = serde_json::json!({"type": "regular", "size": 8, "executable": true});
})]
#[tokio::test]
async fn listing_that_disagrees_with_the_nar_is_rejected_and_the_nar_walked(
    #[case] edit: fn(&mut serde_json::Value),
) {
    let honest = cache();
    let expected = programs_of(&build(&honest, &[jobs_fixture()]).await);

    let up = cache();
    up.set_fault(
        &ls_path(paths::LINKS),
        Fault::override_with(lying_listing(edit)),
    );
    let built = build(&up, &[jobs_fixture()]).await;
    assert_eq!(built.summary.listings_rejected, 1);
    assert_eq!(built.summary.from_nar, 1);
    assert_eq!(built.summary.from_listing, 10);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::LINKS)), 1);
    assert_eq!(programs_of(&built), expected);
    assert!(!program_names(&built).iter().any(|p| p == "evil"));
}

#[tokio::test]
async fn cache_without_listings_has_every_nar_walked_with_the_same_result() {
    let honest = cache();
    let expected = programs_of(&build(&honest, &[jobs_fixture()]).await);

    let up = cache();
    for ls in fixture_listings() {
        up.set_fault(&ls, Fault::NotFound);
    }
    let built = build(&up, &[jobs_fixture()]).await;
    let s = &built.summary;
    assert_eq!(
        (s.from_listing, s.from_nar, s.listings_rejected),
        (0, 11, 0)
    );
    assert_eq!(programs_of(&built), expected);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::LINKS)), 1);
}

#[tokio::test]
async fn zstd_compressed_listing_without_content_encoding_is_accepted() {
    let honest = cache();
    let expected = programs_of(&build(&honest, &[jobs_fixture()]).await);

    let up = cache();
    for store_path in [paths::LINKS, paths::HELLO, paths::BINLINK] {
        let json = std::fs::read(support::cache_dir("cache").join(ls_path(store_path)))
            .expect("reading a fixture listing");
        let compressed = zstd::stream::encode_all(json.as_slice(), 3).expect("zstd");
        up.set_fault(&ls_path(store_path), Fault::override_with(compressed));
    }
    let built = build(&up, &[jobs_fixture()]).await;
    let s = &built.summary;
    assert_eq!(
        (s.from_listing, s.from_nar, s.listings_rejected),
        (11, 0, 0)
    );
    assert_eq!(programs_of(&built), expected);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::LINKS)), 0);
}

#[tokio::test]
async fn brotli_compressed_listing_as_cache_nixos_org_serves_it_is_accepted() {
    let up = cache();
    let json = std::fs::read(support::cache_dir("cache").join(ls_path(paths::LINKS)))
        .expect("reading a fixture listing");
    let mut compressed = Vec::new();
    brotli::BrotliCompress(
        &mut json.as_slice(),
        &mut compressed,
        &brotli::enc::BrotliEncoderParams::default(),
    )
    .expect("brotli");
    up.set_fault(&ls_path(paths::LINKS), Fault::override_with(compressed));
    let built = build(&up, &[jobs_fixture()]).await;
    assert_eq!(built.summary.listings_rejected, 0);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::LINKS)), 0);
}

// ─── Upstream faults ───────────────────────────────────────────────────────────────────

#[tokio::test]
async fn narinfos_failing_once_are_retried_with_the_same_result() {
    let honest = cache();
    let expected = programs_of(&build(&honest, &[jobs_fixture()]).await);

    let up = cache();
    let flaky = [paths::HELLO, paths::LINKS, paths::MULTI_BIN];
    for store_path in flaky {
        up.set_fault(&narinfo_path(store_path), Fault::status_first(500, 1));
    }
    let built = build(&up, &[jobs_fixture()]).await;
    assert_eq!(built.summary.failures, 0);
    assert_eq!(programs_of(&built), expected);
    for store_path in flaky {
        assert!(up.hits(&narinfo_path(store_path)) >= 2, "{store_path}");
    }
}

#[tokio::test]
async fn output_whose_narinfo_always_fails_is_counted_and_the_rest_indexed() {
    let honest = cache();
    let mut expected = programs_of(&build(&honest, &[jobs_fixture()]).await);
    expected.remove(&(SYSTEM.to_owned(), "goodbye".to_owned()));

    let up = cache();
    up.set_fault(&narinfo_path(paths::GOODBYE), Fault::status(500));
    let built = build(&up, &[jobs_fixture()]).await;
    assert_eq!(built.summary.failures, 1);
    assert_eq!(built.summary.not_built, 1);
    assert_eq!(
        built.meta.failures, 2,
        "the failed output and the evaluation error"
    );
    assert_eq!(programs_of(&built), expected);
    let index = index_of(&built);
    assert_eq!(index.resolve(SYSTEM, "goodbye", None), Lookup::Unknown);
    assert_eq!(location(&index, "hello").0, paths::HELLO);
    assert!(up.hits(&narinfo_path(paths::GOODBYE)) > u64::from(RETRIES));
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::GOODBYE)), 0);
}

#[tokio::test]
async fn output_signed_by_an_unknown_key_is_not_indexed() {
    let honest = cache();
    let mut expected = programs_of(&build(&honest, &[jobs_fixture()]).await);
    expected.remove(&(SYSTEM.to_owned(), "binlink-tool".to_owned()));

    let up = cache();
    let forged = Key::unknown().sign(&fixture_narinfo("cache", paths::BINLINK));
    up.set_fault(&narinfo_path(paths::BINLINK), Fault::override_with(forged));
    let built = build(&up, &[jobs_fixture()]).await;
    assert_eq!(built.summary.failures, 1);
    assert_eq!(programs_of(&built), expected);
    let index = index_of(&built);
    assert_eq!(index.resolve(SYSTEM, "binlink-tool", None), Lookup::Unknown);
    assert_eq!(up.hits(&ls_path(paths::BINLINK)), 0);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::BINLINK)), 0);
}

// ─── Bad evaluation input ──────────────────────────────────────────────────────────────

/// The fixture's JSON lines with `bad` inserted so that it is line `at` (1-based).
fn jobs_with_bad_line(at: usize, bad: &str) -> String {
    let text = read_text(&jobs_fixture());
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(at - 1, bad);
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[rstest]
#[case::first_line(1)]
#[case::middle(5)]
#[case::last_line(13)]
#[tokio::test]
async fn malformed_json_line_is_reported_with_its_line_number_and_skipped(#[case] at: usize) {
    let honest = cache();
    let expected = programs_of(&build(&honest, &[jobs_fixture()]).await);

    let up = cache();
    let dir = tempdir();
    let eval = write_file(
        &dir,
        "eval.jsonl",
        &jobs_with_bad_line(at, r#"{"attr":"half","outputs":{"out":"/nix/st"#),
    );
    let built = build(&up, std::slice::from_ref(&eval)).await;
    assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
    let prefix = format!("{}:{at}: ", eval.display());
    assert!(
        built.warnings[0].starts_with(&prefix),
        "{:?} does not start with {prefix:?}",
        built.warnings[0]
    );
    assert_eq!(built.summary.bad_lines, 1);
    assert_eq!(built.summary.attributes, 11);
    assert_eq!(programs_of(&built), expected);
}

#[rstest]
#[case::json_lines_without_outputs(
    "{\"attr\":\"a\",\"attrPath\":[\"a\"],\"system\":\"x86_64-linux\"}\n{not json\n"
)]
#[case::nix_env_without_entries("{}\n")]
#[case::empty_file("")]
#[tokio::test]
async fn evaluation_with_nothing_usable_is_refused(#[case] text: &str) {
    let up = cache();
    let dir = tempdir();
    let eval = write_file(&dir, "eval.json", text);
    match try_build(&up, &[eval]).await {
        Err(BuildError::NothingUsable) => {}
        other => panic!("expected NothingUsable, got {other:?}"),
    }
    assert_eq!(up.total_hits(), 0);
}

#[rstest]
#[case::text("this is not an evaluation\n")]
#[case::json_lines_that_are_all_malformed("{not json\n{\"attr\": 12\n")]
#[case::damaged_nix_env_document("{\n  \"hello\": {\n    \"system\": \"x86_64-linux\",\n")]
#[tokio::test]
async fn evaluation_that_is_not_json_is_refused_with_the_file_name(#[case] text: &str) {
    let up = cache();
    let dir = tempdir();
    let eval = write_file(&dir, "eval.json", text);
    match try_build(&up, std::slice::from_ref(&eval)).await {
        Err(e @ BuildError::Eval(_)) => {
            assert!(e.to_string().contains(&eval.display().to_string()), "{e}");
        }
        other => panic!("expected an evaluation error, got {other:?}"),
    }
    assert_eq!(up.total_hits(), 0);
}

#[tokio::test]
async fn nix_env_entry_without_outputs_is_reported_and_skipped() {
    let honest = cache();
    let mut expected = programs_of(&build(&honest, &[jobs_fixture()]).await);
    expected.remove(&(SYSTEM.to_owned(), "goodbye".to_owned()));

    let mut doc: serde_json::Value =
        serde_json::from_str(&read_text(&eval_fixture("nix-env-meta.json"))).expect("JSON");
    let goodbye = doc["goodbye"]
        .as_object_mut()
        .expect("goodbye is in the evaluation");
    goodbye.remove("outputs");
    let dir = tempdir();
    let eval = write_file(&dir, "eval.json", &doc.to_string());

    let up = cache();
    let built = build(&up, &[eval]).await;
    assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
    assert!(
        built.warnings[0].contains("goodbye"),
        "{:?}",
        built.warnings
    );
    assert_eq!(built.summary.bad_lines, 1);
    assert_eq!(built.summary.attributes, 10);
    assert_eq!(programs_of(&built), expected);
}

// ─── The index file ────────────────────────────────────────────────────────────────────

fn write_index(built: &Built, path: &Path) {
    format::write(
        path,
        &built.meta,
        &built.programs,
        &built.not_built,
        &built.failures,
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Every answer an index gives about the fixture names, for comparison.
fn answers(index: &Index) -> Vec<String> {
    let mut names: Vec<&str> = FIXTURE_PROGRAMS.to_vec();
    names.extend(["notbuilt", "readme", "helo"]);
    names
        .iter()
        .map(|n| match index.resolve(SYSTEM, n, None) {
            Lookup::Found(c) => format!("{n}: {:?}", c.iter().collect::<Vec<_>>()),
            other => format!("{n}: {other:?} {:?}", index.suggest(SYSTEM, n)),
        })
        .collect()
}

#[tokio::test]
async fn written_index_loads_back_with_the_same_answers() {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let dir = tempdir();
    let path = dir.path().join("idx");
    write_index(&built, &path);
    let loaded = Index::load(&path, DEFAULT_MAX_INDEX_SIZE).expect("the written index loads");
    let in_memory = index_of(&built);
    assert_eq!(loaded.metadata(), &built.meta);
    assert_eq!(answers(&loaded), answers(&in_memory));
    assert_eq!(loaded.len(), in_memory.len());
    assert_eq!(
        loaded.failures().collect::<Vec<_>>(),
        in_memory.failures().collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn writing_an_index_leaves_no_temp_file_behind() {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let dir = tempdir();
    let path = dir.path().join("idx");
    write_index(&built, &path);
    assert_eq!(dir_entries(dir.path()), ["idx"]);
    // Replacing an existing index too.
    write_index(&built, &path);
    assert_eq!(dir_entries(dir.path()), ["idx"]);
    Index::load(&path, DEFAULT_MAX_INDEX_SIZE).expect("the replaced index loads");
}

#[rstest]
#[case::byte_flipped_in_the_middle(|b: &mut Vec<u8>| { let at = b.len() / 2; b[at] ^= 0x01; })]
#[case::byte_flipped_in_the_checksum(|b: &mut Vec<u8>| { let at = b.len() - 1; b[at] ^= 0x80; })]
#[case::truncated_by_one_byte(|b: &mut Vec<u8>| { b.pop(); })]
#[case::truncated_to_half(|b: &mut Vec<u8>| { b.truncate(b.len() / 2); })]
#[case::truncated_after_the_header(|b: &mut Vec<u8>| { b.truncate(30); })]
#[case::truncated_inside_the_header(|b: &mut Vec<u8>| { b.truncate(16); })]
#[tokio::test]
async fn damaged_index_file_is_refused_with_a_clear_error(#[case] damage: fn(&mut Vec<u8>)) {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let dir = tempdir();
    let path = dir.path().join("idx");
    write_index(&built, &path);
    let mut bytes = std::fs::read(&path).expect("reading the index");
    damage(&mut bytes);
    std::fs::write(&path, &bytes).expect("damaging the index");
    let err =
        Index::load(&path, DEFAULT_MAX_INDEX_SIZE).expect_err("a damaged index must be refused");
    assert!(matches!(err, IndexError::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("corrupt or truncated"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn file_that_is_not_an_index_is_refused() {
    let dir = tempdir();
    let path = write_file(&dir, "idx", "{\"not\": \"an index\"}\n");
    assert!(matches!(
        Index::load(&path, DEFAULT_MAX_INDEX_SIZE),
        Err(IndexError::NotAnIndex { .. })
    ));
    assert!(matches!(
        Index::load(&dir.path().join("missing"), DEFAULT_MAX_INDEX_SIZE),
        Err(IndexError::Io { .. })
    ));
}

/// Makes a FIFO at `path`: opening it for reading waits for a writer, unless non-blocking.
pub(crate) fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

#[rstest]
#[case::dev_zero("/dev/zero", "a character device")]
#[case::fifo("fifo", "a FIFO")]
#[case::directory(".", "a directory")]
fn index_path_that_is_not_a_regular_file_is_refused_without_reading_it(
    #[case] name: &str,
    #[case] kind: &str,
) {
    let dir = tempdir();
    let path = dir.path().join(name);
    if name == "fifo" {
        mkfifo(&path);
    }
    // Neither waits for a writer (FIFO) nor reads without end (`/dev/zero`).
    let err = Index::load(&path, DEFAULT_MAX_INDEX_SIZE).expect_err("not a regular file");
    assert!(matches!(err, IndexError::NotAFile { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(kind), "{msg}");
    assert!(msg.contains("not a regular file"), "{msg}");
}

#[tokio::test]
async fn index_over_the_size_limit_is_refused_and_one_at_the_limit_loads() {
    let up = cache();
    let built = build(&up, &[jobs_fixture()]).await;
    let dir = tempdir();
    let path = dir.path().join("idx");
    write_index(&built, &path);
    let len = std::fs::metadata(&path).expect("the index").len();
    Index::load(&path, len).expect("an index of exactly the limit loads");
    let err = Index::load(&path, len - 1).expect_err("one byte over the limit");
    assert!(
        matches!(err, IndexError::TooLarge { size, limit, .. } if size == len && limit == len - 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("--max-index-size"), "{err}");

    // A huge file is refused before anything is read (a sparse file: nothing on disk).
    let huge = dir.path().join("huge");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(DEFAULT_MAX_INDEX_SIZE + 1))
        .expect("a sparse file");
    let err = Index::load(&huge, DEFAULT_MAX_INDEX_SIZE).expect_err("over the default limit");
    assert!(matches!(err, IndexError::TooLarge { .. }), "{err:?}");
}

// ─── The command line ──────────────────────────────────────────────────────────────────

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `binplz index build --eval EVAL` against the fixture cache as a `file://` URL.
fn index_build(eval: &Path, output: &Path) -> Command {
    let mut cmd = binplz();
    cmd.args(["index", "build", "--eval"])
        .arg(eval)
        .arg("--upstream")
        .arg(format!("file://{}", support::cache_dir("cache").display()))
        .args(["--trusted-public-key", &Key::test().public()])
        .args(["--revision", REVISION])
        .arg("-o")
        .arg(output);
    cmd
}

/// Builds the fixture index with the binary; returns its directory and path.
fn cli_index() -> (TempDir, PathBuf) {
    let dir = tempdir();
    let idx = dir.path().join("idx");
    let out = run(&mut index_build(&jobs_fixture(), &idx));
    assert_success(&out);
    (dir, idx)
}

fn index_cmd(args: &[&str], idx: &Path) -> Command {
    let mut cmd = binplz();
    cmd.args(["index", args[0]]).arg(idx).args(&args[1..]);
    cmd
}

#[test]
fn cli_index_build_writes_the_index_and_prints_a_summary() {
    let dir = tempdir();
    let idx = dir.path().join("idx");
    let out = run(&mut index_build(&jobs_fixture(), &idx));
    assert_success(&out);
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("indexed 11 attributes, 12 outputs"), "{err}");
    assert!(err.contains("11 programs"), "{err}");
    assert!(err.contains("1 outputs not built"), "{err}");
    assert!(err.contains("1 evaluation errors"), "{err}");
    assert!(err.contains(&format!("wrote {}", idx.display())), "{err}");
    assert_eq!(dir_entries(dir.path()), ["idx"]);
    let index = Index::load(&idx, DEFAULT_MAX_INDEX_SIZE).expect("the written index loads");
    assert_eq!(index.metadata().revision.as_deref(), Some(REVISION));
    assert_eq!(
        location(&index, "hello"),
        (paths::HELLO.into(), "bin/hello".into())
    );
}

#[test]
fn cli_index_build_gives_up_on_a_narinfo_that_never_comes_at_its_deadline() {
    let up = FakeUpstream::serve(support::cache_dir("cache"));
    up.set_fault(&narinfo_path(paths::HELLO), Fault::NoAnswer);
    let dir = tempdir();
    let idx = dir.path().join("idx");
    let mut cmd = binplz();
    cmd.args(["index", "build", "--eval"])
        .arg(jobs_fixture())
        .args(["--upstream", &up.url()])
        .args(["--trusted-public-key", &Key::test().public()])
        .args(["--upstream-narinfo-timeout", "1s", "-o"])
        .arg(&idx);
    let out = run(&mut cmd);
    assert_success(&out);
    let err = stderr(&out);
    assert!(
        err.contains("hello-1.0 reason=") && err.contains("narinfo was not fetched within 1s"),
        "{err}"
    );
    let index = Index::load(&idx, DEFAULT_MAX_INDEX_SIZE).expect("the written index loads");
    assert!(
        !matches!(index.resolve(SYSTEM, "hello", None), Lookup::Found(c) if c.chosen().store_path == paths::HELLO),
        "hello was indexed without its narinfo"
    );
    assert!(
        matches!(index.resolve(SYSTEM, "goodbye", None), Lookup::Found(_)),
        "the other outputs are indexed"
    );
}

#[test]
fn cli_index_show_json_prints_the_choice_and_every_candidate() {
    let (_dir, idx) = cli_index();
    let out = run(&mut index_cmd(&["show", "hello", "--json"], &idx));
    assert_success(&out);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let got: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
    let manifest: serde_json::Value =
        serde_json::from_str(&read_text(&support::fixtures().join("manifest.json")))
            .expect("the manifest is JSON");
    let store = |name: &str| {
        manifest["paths"][name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} is in the manifest"))
            .to_owned()
    };
    let drv = |attr: &str| manifest["drv_paths"][attr].clone();
    let cand = |attr: &str, store_path: &str| serde_json::json!({"attr": attr, "store_path": store_path, "path": "bin/hello", "drv_path": drv(attr)});
    let want = serde_json::json!({
        "program": "hello",
        "system": SYSTEM,
        "attr": "hello",
        "output": "out",
        "store_path": paths::HELLO,
        "path": "bin/hello",
        "drv_path": drv("hello"),
        "built": true,
        "candidates": [
            cand("hello", paths::HELLO),
            cand("hello-too", &store("hello-too")),
            cand("links", paths::LINKS),
            cand("nonexec", paths::NONEXEC),
            cand("tree-dup", &store("tree-dup")),
        ],
    });
    assert_eq!(got, want);
}

#[test]
fn cli_index_show_with_attr_picks_that_attribute() {
    let (_dir, idx) = cli_index();
    let out = run(&mut index_cmd(
        &["show", "hello", "--attr", "hello-too", "--json"],
        &idx,
    ));
    assert_success(&out);
    let got: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(got["attr"], "hello-too");
    assert_eq!(got["candidates"][0]["attr"], "hello-too");

    let out = run(&mut index_cmd(&["show", "hello"], &idx));
    assert_success(&out);
    let text = stdout(&out);
    assert!(text.starts_with("hello (x86_64-linux)\n"), "{text}");
    assert!(
        text.contains(&format!("* hello.out  {}/bin/hello", paths::HELLO)),
        "{text}"
    );
}

#[test]
fn cli_index_show_unknown_program_suggests_close_names() {
    let (_dir, idx) = cli_index();
    let out = run(&mut index_cmd(&["show", "helo"], &idx));
    let line = assert_failure(&out, ErrorKind::UnknownProgram);
    assert!(line.contains("unknown program helo"), "{line}");
    assert!(line.contains("did you mean hello"), "{line}");
}

#[test]
fn cli_index_show_not_built_program_says_so() {
    let (_dir, idx) = cli_index();
    let out = run(&mut index_cmd(&["show", "notbuilt"], &idx));
    let line = assert_failure(&out, ErrorKind::NotBuilt);
    assert!(line.contains("not built"), "{line}");
    assert!(line.contains(paths::NOTBUILT), "{line}");

    // With --json it is an answer, not an error: `built` says it, and the derivation that
    // would build it is named.
    let out = run(&mut index_cmd(&["show", "notbuilt", "--json"], &idx));
    assert_success(&out);
    let got: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("one JSON object");
    assert_eq!(got["store_path"], paths::NOTBUILT);
    assert_eq!(got["drv_path"], drv_paths::NOTBUILT);
    assert_eq!(got["built"], false);
}

#[test]
fn cli_index_show_refuses_an_index_of_the_previous_format_and_says_to_rebuild() {
    let (_dir, idx) = cli_index();
    let mut bytes = std::fs::read(&idx).expect("index");
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&idx, bytes).expect("write");
    let out = run(&mut index_cmd(&["show", "hello"], &idx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("version 1") && err.contains("rebuild it"),
        "{err}"
    );
}

#[test]
fn cli_index_stats_shows_the_revision_and_counts() {
    let (_dir, idx) = cli_index();
    let out = run(&mut index_cmd(&["stats"], &idx));
    assert_success(&out);
    let text = stdout(&out);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(field("revision"), REVISION);
    assert_eq!(field("systems"), SYSTEM);
    assert_eq!(field("attributes"), "11");
    assert_eq!(field("outputs"), "12");
    assert_eq!(field("programs"), "11");
    assert_eq!(field("not built"), "1");
    assert_eq!(field("failures"), "1");
}

#[test]
fn cli_index_build_without_usable_lines_fails_and_writes_nothing() {
    let dir = tempdir();
    let eval = write_file(
        &dir,
        "eval.jsonl",
        "{\"attr\":\"a\",\"attrPath\":[\"a\"],\"system\":\"x86_64-linux\"}\n",
    );
    let idx = dir.path().join("idx");
    let out = run(&mut index_build(&eval, &idx));
    assert!(!out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("binplz: error: nothing usable"), "{err}");
    assert!(!idx.exists());
    assert_eq!(dir_entries(dir.path()), ["eval.jsonl"]);
}

#[test]
fn cli_index_show_on_a_corrupt_index_fails_with_one_line() {
    let (_dir, idx) = cli_index();
    let mut bytes = std::fs::read(&idx).expect("reading the index");
    let at = bytes.len() / 3;
    bytes[at] ^= 0x01;
    std::fs::write(&idx, &bytes).expect("damaging the index");
    for args in [&["show", "hello"][..], &["stats"][..]] {
        let out = run(&mut index_cmd(args, &idx));
        let line = assert_failure(&out, ErrorKind::BadRequest);
        assert!(line.contains("corrupt or truncated"), "{line}");
    }
}

#[test]
fn cli_index_show_and_stats_refuse_a_fifo_and_an_index_over_max_index_size() {
    let (dir, idx) = cli_index();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    for args in [&["show", "hello"][..], &["stats"][..]] {
        let out = run(&mut index_cmd(args, &fifo));
        let line = assert_failure(&out, ErrorKind::BadRequest);
        assert!(line.contains("is a FIFO, not a regular file"), "{line}");

        let mut cmd = index_cmd(args, &idx);
        cmd.args(["--max-index-size", "1K"]);
        let line = assert_failure(&run(&mut cmd), ErrorKind::BadRequest);
        assert!(
            line.contains("larger than the limit of 1024 bytes"),
            "{line}"
        );

        let mut cmd = index_cmd(args, &idx);
        cmd.env("BINPLZ_MAX_INDEX_SIZE", "1M");
        assert_success(&run(&mut cmd));
    }
}

/// `binplz serve --index INDEX` against the fixture cache.
fn serve_with_index(index: &Path, cache_dir: &Path) -> Command {
    let mut cmd = binplz();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--index"])
        .arg(index)
        .arg("--upstream")
        .arg(format!("file://{}", support::cache_dir("cache").display()))
        .args(["--trusted-public-key", &Key::test().public()])
        .arg("--cache-dir")
        .arg(cache_dir)
        .env("BINPLZ_LOG", "off")
        .stdin(std::process::Stdio::null());
    cmd
}

#[rstest]
#[case::dev_zero("/dev/zero", None, "is a character device, not a regular file")]
#[case::fifo("fifo", None, "is a FIFO, not a regular file")]
#[case::over_the_limit("idx", Some("1K"), "larger than the limit of 1024 bytes")]
fn serve_refuses_to_start_on_an_index_it_must_not_read(
    #[case] name: &str,
    #[case] limit: Option<&str>,
    #[case] why: &str,
) {
    let (dir, _idx) = cli_index();
    let path = dir.path().join(name);
    if name == "fifo" {
        mkfifo(&path);
    }
    let mut cmd = serve_with_index(&path, &dir.path().join("cache"));
    if let Some(limit) = limit {
        cmd.args(["--max-index-size", limit]);
    }
    let out = run(&mut cmd);
    let line = assert_failure(&out, ErrorKind::BadRequest);
    assert!(line.contains(why), "{line}");
}

#[test]
fn serve_refuses_a_max_index_size_of_zero() {
    let (dir, idx) = cli_index();
    let mut cmd = serve_with_index(&idx, &dir.path().join("cache"));
    cmd.args(["--max-index-size", "0"]);
    let line = assert_failure(&run(&mut cmd), ErrorKind::BadRequest);
    assert!(
        line.contains("--max-index-size must be more than 0"),
        "{line}"
    );
}
