//! The properties the fuzz targets in `fuzz/` check, one module per target.
//!
//! They live in the library, not in the targets, so that `cargo test` (which runs on stable,
//! without libFuzzer) checks them on every committed seed in `fuzz/seeds/<target>/` too. Each
//! module's `check` panics only when a property is broken; any input is otherwise fine.
//! Not an API: hidden from the docs, and free to change with the targets.

pub mod index_loader;
pub mod ls;
pub mod nar_reader;
pub mod narinfo;
pub mod range_headers;
pub mod request_head;

/// Every seed of `target`, with its file name, for the modules' tests.
#[cfg(test)]
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("seed directory entry").path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name.unwrap_or_default(), bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}
