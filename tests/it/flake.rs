//! `flake.nix`: every `.nix` file parses, and the NixOS module's option tables name only
//! flags the binary has (and, for `serve`, every flag it has), checked with real Nix against
//! `binplz … --help`. Where a Nixpkgs is found (`NIXPKGS`, or `<nixpkgs>` on `NIX_PATH`),
//! the module is also evaluated into systemd units.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::cli::{binplz, run};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nix_instantiate() -> Command {
    let mut cmd = Command::new("nix-instantiate");
    cmd.env(
        "NIX_CONFIG",
        "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =",
    );
    cmd.current_dir(root());
    cmd
}

#[track_caller]
fn nix_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .expect("running nix-instantiate (Debian's nix-bin; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The flake's `lib`, which needs no Nixpkgs.
fn flake_lib() -> Value {
    let expr = "let f = import ./flake.nix; o = f.outputs { self = o; nixpkgs = throw \"no Nixpkgs here\"; }; \
                in { inherit (o.lib) flags managedFlags; }";
    let json = nix_ok(nix_instantiate().args(["--eval", "--strict", "--json", "-E", expr]));
    serde_json::from_str(&json).expect("nix-instantiate printed JSON")
}

/// Every long flag `binplz ARGS --help` lists, without `--help` and `--version`.
fn help_flags(args: &[&str]) -> BTreeSet<String> {
    let out = run(binplz().args(args).arg("--help"));
    assert!(out.status.success(), "binplz {args:?} --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("-o, ").unwrap_or(line);
            let line = line.strip_prefix("-h, ").unwrap_or(line);
            let flag = line.strip_prefix("--")?;
            let end = flag
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(flag.len());
            Some(format!("--{}", &flag[..end]))
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

fn table_flags(lib: &Value, table: &str, key: &str) -> BTreeSet<String> {
    lib[table][key]
        .as_array()
        .unwrap_or_else(|| panic!("flake lib.{table}.{key} is a list"))
        .iter()
        .map(|row| match row {
            Value::String(flag) => flag.clone(),
            row => row["flag"]
                .as_str()
                .expect("each row has a flag")
                .to_owned(),
        })
        .collect()
}

#[test]
fn every_nix_file_parses() {
    let out = Command::new("git")
        .args(["ls-files", "*.nix", "**/*.nix"])
        .current_dir(root())
        .output()
        .expect("git ls-files");
    let mut files: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    // A checkout without git metadata (a source tarball) still has these.
    files.insert("flake.nix".to_owned());
    files.insert("fixtures/default.nix".to_owned());
    for file in &files {
        nix_ok(nix_instantiate().args(["--parse", file]));
    }
}

/// The flags flake.nix passes for `command` (its table and the flags the module sets
/// itself) against `binplz ARGS --help`: none it lacks, and, with `every`, none missing.
#[track_caller]
fn assert_module_flags(table: &str, args: &[&str], every: bool) {
    let lib = flake_lib();
    let help = help_flags(args);
    let command = args.join(" ");
    let rows = table_flags(&lib, "flags", table);
    let managed = table_flags(&lib, "managedFlags", table);
    let unknown: Vec<_> = rows
        .union(&managed)
        .filter(|f| !help.contains(*f))
        .collect();
    assert!(
        unknown.is_empty(),
        "flake.nix passes flags `binplz {command}` does not have: {unknown:?}"
    );
    if every {
        let missing: Vec<_> = help
            .iter()
            .filter(|f| !rows.contains(*f) && !managed.contains(*f))
            .collect();
        assert!(
            missing.is_empty(),
            "`binplz {command}` flags with no NixOS option in flake.nix: {missing:?}"
        );
    }
}

#[test]
fn the_edge_module_passes_every_serve_flag_and_only_those() {
    assert_module_flags("serve", &["serve"], true);
}

#[test]
fn the_builder_module_passes_every_builder_flag_and_only_those() {
    assert_module_flags("builder", &["builder"], true);
}

#[test]
fn the_index_module_passes_only_flags_index_build_has() {
    assert_module_flags("index", &["index", "build"], false);
}

#[test]
fn the_option_tables_turn_values_into_arguments() {
    let expr = r#"let f = import ./flake.nix; o = f.outputs { self = o; nixpkgs = throw "no Nixpkgs"; };
        table = [
          { name = "listen"; flag = "--listen"; }
          { name = "upstreams"; flag = "--upstream"; }
          { name = "requireSigs"; flag = "--no-require-sigs"; invert = true; }
          { name = "threads"; flag = "--threads"; }
          { name = "size"; flag = "--memory-cache-size"; }
        ];
      in o.lib.toArgs table { listen = "[::]:80"; upstreams = [ "a" "b" ]; requireSigs = false; threads = null; size = 1024; }"#;
    let json = nix_ok(nix_instantiate().args(["--eval", "--strict", "--json", "-E", expr]));
    let args: Vec<String> = serde_json::from_str(&json).expect("a JSON list");
    assert_eq!(
        args,
        [
            "--listen",
            "[::]:80",
            "--upstream",
            "a",
            "--upstream",
            "b",
            "--no-require-sigs",
            "--memory-cache-size",
            "1024"
        ]
    );
}

/// Only where a Nixpkgs is at hand: the module evaluates into units whose command lines
/// carry the options' flags.
#[test]
fn the_module_evaluates_where_nixpkgs_is_found() {
    let nixpkgs = match std::env::var("NIXPKGS") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            let out = nix_instantiate()
                .args(["--find-file", "nixpkgs"])
                .output()
                .ok();
            out.filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        }
    };
    let Some(nixpkgs) = nixpkgs.filter(|p| Path::new(p).join("nixos").is_dir()) else {
        eprintln!("no Nixpkgs (set NIXPKGS or NIX_PATH): the module is only parsed and its tables checked");
        return;
    };
    let expr = format!(
        r#"let f = import ./flake.nix;
             o = f.outputs {{ self = o // {{ outPath = ./.; }}; nixpkgs = {{ lib = import {nixpkgs}/lib; legacyPackages = {{}}; }}; }};
             sys = import {nixpkgs}/nixos/lib/eval-config.nix {{
               system = "x86_64-linux";
               modules = [ o.nixosModules.default {{
                 services.binplz.package = (import {nixpkgs} {{}}).hello;
                 services.binplz.edge = {{ enable = true; listen = "0.0.0.0:8080"; openFirewall = true; }};
                 services.binplz.builder = {{ enable = true; secretKeyFile = "/run/keys/binplz"; }};
                 fileSystems."/".device = "none"; boot.loader.grub.enable = false; system.stateVersion = "24.11";
               }} ];
             }};
           in {{ edge = sys.config.systemd.services.binplz-edge.serviceConfig.ExecStart;
                builder = sys.config.systemd.services.binplz-builder.serviceConfig.ExecStart; }}"#
    );
    let json = nix_ok(nix_instantiate().args(["--eval", "--strict", "--json", "-E", &expr]));
    let units: Value = serde_json::from_str(&json).expect("JSON");
    let edge = units["edge"].as_str().expect("the edge's ExecStart");
    assert!(edge.contains("--listen 0.0.0.0:8080"), "{edge}");
    assert!(edge.contains("--builder http://127.0.0.1:8081"), "{edge}");
    let builder = units["builder"].as_str().expect("the builder's ExecStart");
    assert!(
        builder.contains("--secret-key-file %d/signing-key"),
        "{builder}"
    );
}
