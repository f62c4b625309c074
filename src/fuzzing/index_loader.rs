//! Arbitrary bytes as an index file: refused with an error or loaded, and every lookup on
//! a loaded one (resolving, candidates, suggestions, search) answers without a panic.
//!
//! Random bytes rarely carry a valid checksum, so each input is also tried with its last
//! 32 bytes replaced by the SHA-256 of the rest: that lets the fuzzer reach the parser and
//! the checks behind the checksum.

use sha2::{Digest, Sha256};

use crate::index::names::MAX_SUGGESTIONS;
use crate::index::{Index, Lookup};

/// Most programs of one input looked up (each costs a few lookups).
const MAX_PROGRAMS_PROBED: usize = 64;
/// The search results page's size.
const SEARCH_LIMIT: usize = 50;

pub fn check(data: &[u8]) {
    probe(data.to_vec());
    if let Some(body) = data.len().checked_sub(32) {
        let mut fixed = data.to_vec();
        let sum = Sha256::digest(&fixed[..body]);
        fixed[body..].copy_from_slice(&sum);
        probe(fixed);
    }
}

fn probe(bytes: Vec<u8>) {
    let Ok(index) = Index::from_bytes(bytes, "fuzz") else {
        return;
    };
    let _ = index.metadata();
    let _ = index.failures().count();
    let keys: Vec<(String, String)> = index
        .programs()
        .take(MAX_PROGRAMS_PROBED)
        .map(|(s, n)| (s.to_owned(), n.to_owned()))
        .collect();
    let mut queries: Vec<(String, String)> = keys.clone();
    for (system, name) in &keys {
        let mut shorter = name.clone();
        shorter.pop();
        queries.push((system.clone(), shorter));
        queries.push((system.clone(), format!("{name}x")));
        if let Lookup::Found(found) = index.resolve(system, name, None) {
            assert!(!found.is_empty());
            let chosen = found.chosen();
            assert_eq!(found.iter().count(), found.len());
            // Asking for the chosen candidate's attribute finds that attribute.
            if let Lookup::Found(again) = index.resolve(system, name, Some(chosen.attr)) {
                assert_eq!(again.chosen().attr, chosen.attr);
            }
        }
    }
    queries.push(("x86_64-linux".into(), "tree".into()));
    queries.push(("x86_64-linux".into(), "a".into()));
    for (system, query) in &queries {
        let suggestions = index.suggest(system, query);
        assert!(suggestions.len() <= MAX_SUGGESTIONS, "{suggestions:?}");
        assert!(!suggestions.contains(query), "{query} suggested for itself");
        let found = index.search(system, query, SEARCH_LIMIT);
        assert!(found.len() <= SEARCH_LIMIT);
        let lower = query.to_ascii_lowercase();
        for name in found {
            assert!(
                name.to_ascii_lowercase().contains(&lower),
                "{name:?} found for {query:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_committed_seed_keeps_the_properties() {
        for (name, bytes) in super::super::seeds("index_loader") {
            println!("{name}");
            super::check(&bytes);
        }
    }
}
