//! The index's program names, arranged when the index loads so that suggestions for an
//! unknown name and `/-/search` answer without reading every name.
//!
//! Per system, every name is kept lowercased in one byte array, grouped by length and
//! sorted within a group:
//!
//! ```text
//!  group 1: "a" "x"          group 2: "cc" "fd" "rg"      group 4: "htop" "tree" …
//!  bytes:   a x c c f d r g h t o p t r e e …   (fixed width within a group)
//!  slots:   the program table slot of each name, in the same order
//! ```
//!
//! - A suggestion is a name within a small edit distance, or one that starts with the typed
//!   name. Only the groups whose length is within that distance can hold the first kind;
//!   each is walked as the trie its sorted names make, a Levenshtein row per depth, and a
//!   prefix whose row already exceeds the bound skips every name that shares it. Lowercase
//!   distance never exceeds the real one, so the walk finds every candidate and the real
//!   distance then decides. Names that start with the typed name are a binary search per
//!   group.
//! - Search lists names containing the query: those starting with it (a binary search per
//!   group, shortest first), then those containing it elsewhere (`memmem` over a group's
//!   bytes, where a match's offset gives its name), until enough are found.
//!
//! Building it costs one sort of the names and about their bytes plus four bytes each of
//! memory (`cargo bench --bench index` reports both for a million programs).

use std::time::{Duration, Instant};

use super::MAX_PROGRAM_NAME;

/// Most suggestions given for one unknown name.
pub const MAX_SUGGESTIONS: usize = 5;
/// Most names a suggestion looks at per length group among those starting with the typed
/// name (in lowercase) but differing in case: bounds the work when many names do so,
/// at worst at the cost of a suggestion in another case.
const MAX_PREFIX_SCAN: usize = 64;

/// One system's names.
#[derive(Debug, Default)]
struct SystemNames {
    system: String,
    /// Lowercased names, by length then bytes (then original bytes), one group per length.
    bytes: Vec<u8>,
    /// Group `l` (names of `l` bytes) is `bytes[at[l]..at[l + 1]]`; `first[l]` is the
    /// number of names before it.
    at: Vec<usize>,
    first: Vec<usize>,
    /// Each name's slot in the program table.
    slots: Vec<u32>,
}

/// A group of names of one length.
struct Group<'a> {
    width: usize,
    bytes: &'a [u8],
    slots: &'a [u32],
}

impl<'a> Group<'a> {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn name(&self, i: usize) -> &'a [u8] {
        &self.bytes[i * self.width..(i + 1) * self.width]
    }

    /// The names that start with `prefix` (lowercase): an index range.
    fn with_prefix(&self, prefix: &[u8]) -> std::ops::Range<usize> {
        let key = |i: usize| &self.name(i)[..prefix.len()];
        let start = partition_point(self.len(), |i| key(i) < prefix);
        let end = start + partition_point(self.len() - start, |i| key(start + i) == prefix);
        start..end
    }
}

/// `slice::partition_point` over the indices `0..n`.
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

impl SystemNames {
    fn group(&self, width: usize) -> Option<Group<'_>> {
        if width == 0 || width > MAX_PROGRAM_NAME {
            return None;
        }
        let (from, to) = (*self.at.get(width)?, *self.at.get(width + 1)?);
        let n = (to - from) / width;
        let first = *self.first.get(width)?;
        Some(Group {
            width,
            bytes: self.bytes.get(from..to)?,
            slots: self.slots.get(first..first + n)?,
        })
    }
}

/// Every system's names, and what building them cost.
#[derive(Debug, Default)]
pub struct Names {
    systems: Vec<SystemNames>,
    built_in: Duration,
}

/// What the name structures cost: memory, and time at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamesCost {
    pub bytes: usize,
    pub built_in: Duration,
}

impl Names {
    /// Arranges `(slot, system, name)` triples. Names that no request can ask for (empty,
    /// or longer than [`MAX_PROGRAM_NAME`]) are left out.
    pub fn build<'a>(entries: impl Iterator<Item = (u32, &'a str, &'a str)>) -> Names {
        let start = Instant::now();
        // Per system and length: (first 8 lowercase bytes as a big-endian number, offset
        // of the lowercase name in `lower`, index in `originals`). Sorting these records
        // themselves, the number decides most comparisons without touching the names,
        // which would be a cache miss each.
        struct Pending<'a> {
            system: &'a str,
            lower: Vec<u8>,
            by_len: Vec<Vec<(u64, u32, u32)>>,
            originals: Vec<(u32, &'a str)>,
        }
        let mut pending: Vec<Pending<'a>> = Vec::new();
        for (slot, system, name) in entries {
            if name.is_empty() || name.len() > MAX_PROGRAM_NAME {
                continue;
            }
            let p = match pending.iter().position(|p| p.system == system) {
                Some(i) => &mut pending[i],
                None => {
                    pending.push(Pending {
                        system,
                        lower: Vec::new(),
                        by_len: vec![Vec::new(); MAX_PROGRAM_NAME + 1],
                        originals: Vec::new(),
                    });
                    let last = pending.len() - 1;
                    &mut pending[last]
                }
            };
            let (Ok(off), Ok(idx)) = (
                u32::try_from(p.lower.len()),
                u32::try_from(p.originals.len()),
            ) else {
                continue;
            };
            let at = p.lower.len();
            p.lower.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
            let mut head = [0u8; 8];
            let n = name.len().min(8);
            head[..n].copy_from_slice(&p.lower[at..at + n]);
            p.by_len[name.len()].push((u64::from_be_bytes(head), off, idx));
            p.originals.push((slot, name));
        }
        let systems = pending
            .into_iter()
            .map(|mut p| {
                let (lower, originals) = (&p.lower, &p.originals);
                let mut names = SystemNames {
                    system: p.system.to_owned(),
                    bytes: Vec::with_capacity(lower.len()),
                    at: vec![0; MAX_PROGRAM_NAME + 2],
                    first: vec![0; MAX_PROGRAM_NAME + 2],
                    slots: Vec::with_capacity(originals.len()),
                };
                for (len, group) in p.by_len.iter_mut().enumerate() {
                    group.sort_unstable_by(|a, b| {
                        a.0.cmp(&b.0).then_with(|| {
                            let (oa, ob) = (a.1 as usize, b.1 as usize);
                            lower[oa..oa + len].cmp(&lower[ob..ob + len]).then_with(|| {
                                originals[a.2 as usize].1.cmp(originals[b.2 as usize].1)
                            })
                        })
                    });
                    names.at[len] = names.bytes.len();
                    names.first[len] = names.slots.len();
                    for &(_, off, idx) in group.iter() {
                        let off = off as usize;
                        names.bytes.extend_from_slice(&lower[off..off + len]);
                        names.slots.push(originals[idx as usize].0);
                    }
                }
                names.at[MAX_PROGRAM_NAME + 1] = names.bytes.len();
                names.first[MAX_PROGRAM_NAME + 1] = names.slots.len();
                names
            })
            .collect();
        Names {
            systems,
            built_in: start.elapsed(),
        }
    }

    pub fn cost(&self) -> NamesCost {
        let bytes = self
            .systems
            .iter()
            .map(|s| {
                s.system.len()
                    + s.bytes.capacity()
                    + s.slots.capacity() * 4
                    + (s.at.capacity() + s.first.capacity()) * std::mem::size_of::<usize>()
            })
            .sum();
        NamesCost {
            bytes,
            built_in: self.built_in,
        }
    }

    fn system(&self, system: &str) -> Option<&SystemNames> {
        self.systems.iter().find(|s| s.system == system)
    }

    /// Up to [`MAX_SUGGESTIONS`] names close to `program`: within a Levenshtein distance
    /// of 2 (1 for names under five bytes, which two edits turn into almost any other),
    /// then names that start with it (three bytes or more), nearest first, then in byte
    /// order. `name_of` gives a slot's name as the index holds it.
    pub fn suggest<'a>(
        &self,
        system: &str,
        program: &str,
        name_of: impl Fn(u32) -> &'a str,
    ) -> Vec<String> {
        let Some(names) = self.system(system) else {
            return Vec::new();
        };
        let typed = program.as_bytes();
        if typed.is_empty() || typed.len() > MAX_PROGRAM_NAME {
            return Vec::new();
        }
        let lower = typed.to_ascii_lowercase();
        let max = if typed.len() < 5 { 1 } else { 2 };
        let mut found: Vec<(usize, &'a str)> = Vec::new();
        let widths = typed.len().saturating_sub(max).max(1)..=typed.len() + max;
        for width in widths {
            let Some(group) = names.group(width) else {
                continue;
            };
            within_distance(&group, &lower, max, |slot| {
                let name = name_of(slot);
                if name != program {
                    if let Some(d) = bounded_distance(typed, name.as_bytes(), max) {
                        found.push((d, name));
                    }
                }
            });
        }
        if typed.len() >= 3 {
            let near = found.len();
            for width in typed.len() + 1..=MAX_PROGRAM_NAME {
                let Some(group) = names.group(width) else {
                    continue;
                };
                let mut taken = 0;
                for i in group.with_prefix(&lower).take(MAX_PREFIX_SCAN) {
                    let name = name_of(group.slots[i]);
                    if name.starts_with(program) {
                        found.push((3, name));
                        taken += 1;
                        // Enough for the answer even if every near name is among them.
                        if taken == MAX_SUGGESTIONS + near {
                            break;
                        }
                    }
                }
            }
        }
        // A name both near and a prefix counts once, at its distance.
        found.sort_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(&b.0)));
        found.dedup_by(|later, first| later.1 == first.1);
        found.sort();
        found
            .into_iter()
            .take(MAX_SUGGESTIONS)
            .map(|(_, n)| n.to_owned())
            .collect()
    }

    /// The slots of up to `limit` names containing `query` (compared in lowercase) for
    /// which `wanted` holds: names equal to it, then starting with it, then containing it
    /// elsewhere; shorter names first within each, then in byte order.
    pub fn search(
        &self,
        system: &str,
        query: &str,
        limit: usize,
        wanted: impl Fn(u32) -> bool,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        let Some(names) = self.system(system) else {
            return out;
        };
        let q = query.as_bytes().to_ascii_lowercase();
        if q.is_empty() || q.len() > MAX_PROGRAM_NAME || limit == 0 {
            return out;
        }
        for width in q.len()..=MAX_PROGRAM_NAME {
            let Some(group) = names.group(width) else {
                continue;
            };
            for i in group.with_prefix(&q) {
                if wanted(group.slots[i]) {
                    out.push(group.slots[i]);
                    if out.len() == limit {
                        return out;
                    }
                }
            }
        }
        let finder = memchr::memmem::Finder::new(&q);
        for width in q.len() + 1..=MAX_PROGRAM_NAME {
            let Some(group) = names.group(width) else {
                continue;
            };
            let mut last = None;
            for at in finder.find_iter(group.bytes) {
                let (i, off) = (at / width, at % width);
                // Inside one name, not across two; names starting with it came first.
                if off + q.len() > width || last == Some(i) || group.name(i).starts_with(&q) {
                    continue;
                }
                last = Some(i);
                if wanted(group.slots[i]) {
                    out.push(group.slots[i]);
                    if out.len() == limit {
                        return out;
                    }
                }
            }
        }
        out
    }
}

/// Calls `hit` with the slot of every name of `group` within Levenshtein distance `max` of
/// `typed` (both lowercase), walking the sorted names as a trie: the rows of names that
/// share a prefix are computed once, and a prefix that cannot end within `max` skips
/// every name that starts with it.
fn within_distance(group: &Group<'_>, typed: &[u8], max: usize, mut hit: impl FnMut(u32)) {
    let (width, n) = (group.width, typed.len());
    // rows[d] is the row after `d` bytes of the current name.
    let mut rows = vec![0usize; (width + 1) * (n + 1)];
    for (j, r) in rows[..=n].iter_mut().enumerate() {
        *r = j;
    }
    // Rows 0..=valid hold the prefix of `prev` of that many bytes.
    let mut valid = 0;
    let mut prev: &[u8] = &[];
    let mut i = 0;
    'names: while i < group.len() {
        let name = group.name(i);
        let shared = name
            .iter()
            .zip(prev)
            .take(valid)
            .take_while(|(a, b)| a == b)
            .count();
        for d in shared + 1..=width {
            let (before, row) = rows.split_at_mut(d * (n + 1));
            let above = &before[(d - 1) * (n + 1)..];
            let row = &mut row[..=n];
            let c = name[d - 1];
            row[0] = d;
            // The least final distance still possible: this row's cost plus the length
            // difference of what is left of both.
            let mut least = d + (width - d).abs_diff(n);
            for j in 1..=n {
                let sub = above[j - 1] + usize::from(typed[j - 1] != c);
                row[j] = sub.min(above[j] + 1).min(row[j - 1] + 1);
                least = least.min(row[j] + (width - d).abs_diff(n - j));
            }
            if least > max {
                valid = d - 1;
                prev = name;
                i = skip_prefix(group, i, d);
                continue 'names;
            }
        }
        valid = width;
        prev = name;
        if rows[width * (n + 1) + n] <= max {
            hit(group.slots[i]);
        }
        i += 1;
    }
}

/// The first name after `i` that does not share name `i`'s first `d` bytes (galloping, as
/// most skipped subtrees are small).
fn skip_prefix(group: &Group<'_>, i: usize, d: usize) -> usize {
    let prefix = &group.name(i)[..d];
    let same = |j: usize| j < group.len() && &group.name(j)[..d] == prefix;
    let mut step = 1;
    while same(i + step) {
        step *= 2;
    }
    // Names i + step/2 (or i) share it; i + step does not (or is past the end).
    let lo = i + step / 2;
    let hi = (i + step).min(group.len());
    lo + partition_point(hi - lo, |k| same(lo + k))
}

/// Levenshtein distance, or `None` when it exceeds `max`.
pub(super) fn bounded_distance(a: &[u8], b: &[u8], max: usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        let mut row_min = cur[0];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
            row_min = row_min.min(cur[j + 1]);
        }
        if row_min > max {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    (prev[b.len()] <= max).then_some(prev[b.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSTEM: &str = "x86_64-linux";

    fn names(list: &[&'static str]) -> (Names, Vec<&'static str>) {
        let names = Names::build(list.iter().enumerate().map(|(i, n)| (i as u32, SYSTEM, *n)));
        (names, list.to_vec())
    }

    /// What the index answered before these structures: every name scanned.
    fn suggest_by_scan(list: &[&str], program: &str) -> Vec<String> {
        let mut best: Vec<(usize, &str)> = Vec::new();
        for &name in list {
            if name == program {
                continue;
            }
            let max = if program.len() < 5 { 1 } else { 2 };
            let d = bounded_distance(program.as_bytes(), name.as_bytes(), max)
                .or_else(|| (program.len() >= 3 && name.starts_with(program)).then_some(3));
            if let Some(d) = d {
                best.push((d, name));
            }
        }
        best.sort();
        best.dedup_by(|a, b| a.1 == b.1);
        best.into_iter()
            .take(MAX_SUGGESTIONS)
            .map(|(_, n)| n.to_owned())
            .collect()
    }

    const LIST: &[&str] = &[
        "tree",
        "trees",
        "tee",
        "free",
        "htop",
        "top",
        "ripgrep",
        "rg",
        "git",
        "gitk",
        "git-lfs",
        "gitui",
        "Tree",
        "TREEX",
        "fd",
        "fzf",
        "hello",
        "hello2",
        "helloworld",
        "jq",
        "yq",
        "a",
        "b",
        "python3",
        "python3.12",
        "python",
        "pythonw",
        "ab",
        "abc",
    ];

    #[test]
    fn suggestions_are_those_a_scan_of_every_name_gives() {
        let (n, list) = names(LIST);
        let name_of = |slot: u32| list[slot as usize];
        let typed = [
            "tre",
            "treee",
            "tree",
            "gti",
            "git",
            "helo",
            "hell",
            "pyton",
            "python3.1",
            "x",
            "ab",
            "rgg",
            "TREE",
            "Tre",
            "zzzzzz",
            "fdd",
            "gitu",
        ];
        for t in typed {
            assert_eq!(
                n.suggest(SYSTEM, t, name_of),
                suggest_by_scan(&list, t),
                "suggestions for {t:?}"
            );
        }
        assert!(n.suggest("aarch64-linux", "tre", name_of).is_empty());
    }

    #[test]
    fn the_trie_walk_finds_what_a_scan_finds_on_many_similar_names() {
        // Every name of up to four bytes over a small alphabet: many shared prefixes.
        let mut list: Vec<String> = Vec::new();
        let alphabet = ["a", "b", "c", "ab"];
        for x in alphabet {
            for y in alphabet {
                for z in ["", "a", "c"] {
                    list.push(format!("{x}{y}{z}"));
                }
            }
        }
        list.sort();
        list.dedup();
        let refs: Vec<&str> = list.iter().map(String::as_str).collect();
        let n = Names::build(refs.iter().enumerate().map(|(i, s)| (i as u32, SYSTEM, *s)));
        for t in ["ab", "abc", "ca", "bbb", "abab", "cccc", "aaaaa", "abcab"] {
            assert_eq!(
                n.suggest(SYSTEM, t, |s| refs[s as usize]),
                suggest_by_scan(&refs, t),
                "suggestions for {t:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn suggestions_agree_with_a_scan_on_random_names(
            list in proptest::collection::btree_set("[abc.1-]{1,7}", 1..200),
            typed in "[abc.1-]{1,8}",
        ) {
            let list: Vec<&str> = list.iter().map(String::as_str).collect();
            let n = Names::build(list.iter().enumerate().map(|(i, s)| (i as u32, SYSTEM, *s)));
            proptest::prop_assert_eq!(
                n.suggest(SYSTEM, &typed, |s| list[s as usize]),
                suggest_by_scan(&list, &typed)
            );
        }
    }

    #[test]
    fn an_unknown_name_reads_few_names_of_a_large_index() {
        // 100,000 names of 4 to 9 bytes over a small alphabet, like a real index's mix.
        let mut x: u64 = 1;
        let list: Vec<String> = (0..100_000)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = 4 + (x >> 60) as usize % 6;
                let mut s: String = (0..len)
                    .map(|k| (b'a' + ((x >> (k * 5)) % 12) as u8) as char)
                    .collect();
                s.push_str(&i.to_string());
                s
            })
            .collect();
        let refs: Vec<&str> = list.iter().map(String::as_str).collect();
        let n = Names::build(refs.iter().enumerate().map(|(i, s)| (i as u32, SYSTEM, *s)));
        for typed in ["abcdefg1234", "kkkk", "hello", "abc", "zzzzzzzzzz"] {
            let read = std::cell::Cell::new(0);
            let got = n.suggest(SYSTEM, typed, |s| {
                read.set(read.get() + 1);
                refs[s as usize]
            });
            assert!(
                read.get() < 1000,
                "{typed}: {} of {} names read",
                read.get(),
                refs.len()
            );
            assert_eq!(got, suggest_by_scan(&refs, typed), "{typed}");
        }
    }

    #[test]
    fn search_lists_equal_then_prefix_then_containing_names_shortest_first() {
        let (n, list) = names(LIST);
        let found = |q: &str, limit: usize| -> Vec<&str> {
            n.search(SYSTEM, q, limit, |_| true)
                .into_iter()
                .map(|s| list[s as usize])
                .collect()
        };
        assert_eq!(found("tree", 50), ["Tree", "tree", "trees", "TREEX"]);
        assert_eq!(found("git", 50), ["git", "gitk", "gitui", "git-lfs"]);
        assert_eq!(
            found("ee", 50),
            ["tee", "free", "Tree", "tree", "trees", "TREEX"]
        );
        assert_eq!(found("python3", 2), ["python3", "python3.12"]);
        assert_eq!(found("git", 2), ["git", "gitk"]);
        assert!(found("nothing", 50).is_empty());
        // A match across two names of a group is none.
        assert!(found("eet", 50).is_empty());
        let only_odd: Vec<u32> = n.search(SYSTEM, "tree", 50, |s| s % 2 == 1);
        assert!(only_odd.iter().all(|s| s % 2 == 1));
    }

    #[test]
    fn names_no_request_can_name_are_left_out() {
        let long = "x".repeat(MAX_PROGRAM_NAME + 1);
        let list = ["", long.as_str(), "ok"];
        let n = Names::build(list.iter().enumerate().map(|(i, s)| (i as u32, SYSTEM, *s)));
        assert_eq!(n.search(SYSTEM, "x", 50, |_| true), Vec::<u32>::new());
        assert_eq!(n.search(SYSTEM, "ok", 50, |_| true), [2]);
        assert!(n.suggest(SYSTEM, &long, |s| list[s as usize]).is_empty());
    }

    #[test]
    fn bounded_distance_is_levenshtein_up_to_the_bound() {
        assert_eq!(bounded_distance(b"tree", b"tree", 2), Some(0));
        assert_eq!(bounded_distance(b"tree", b"tre", 2), Some(1));
        assert_eq!(bounded_distance(b"ripgrep", b"ripgrap", 2), Some(1));
        assert_eq!(bounded_distance(b"abc", b"xyz", 2), None);
        assert_eq!(bounded_distance(b"a", b"abcd", 2), None);
    }
}
