//! Will the extracted file run outside Nix? The portability verdict.
//!
//! ELF files are read through `object`'s lazy [`ReadCache`], so only the headers, the
//! dynamic section and its strings are read, never the whole binary.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek};

use object::elf;
use object::read::elf::{Dyn, ElfFile, FileHeader, ProgramHeader};
use object::read::ReadCache;
use object::{Endianness, ReadRef};

const NIX_STORE: &str = "/nix/store/";

/// Longest shebang line looked at (Linux's `BINPRM_BUF_SIZE` is 256).
const SHEBANG_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    /// An ELF that needs no interpreter and no shared libraries.
    Static,
    /// An ELF that needs a dynamic loader or libraries.
    Dynamic {
        interpreter: Option<String>,
        needed: Vec<String>,
        runpath: Vec<String>,
    },
    /// A script, with its `#!` line's interpreter (and arguments).
    Script {
        interpreter: String,
    },
    Other,
}

impl Linkage {
    /// The short name used in headers: `static`, `dynamic`, `script` or `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            Linkage::Static => "static",
            Linkage::Dynamic { .. } => "dynamic",
            Linkage::Script { .. } => "script",
            Linkage::Other => "other",
        }
    }

    /// Why the file cannot run without `/nix/store`, if it cannot.
    pub fn needs_nix_store(&self) -> Option<String> {
        match self {
            Linkage::Dynamic {
                interpreter,
                needed,
                runpath,
            } => {
                if let Some(i) = interpreter.as_deref().filter(|i| i.starts_with(NIX_STORE)) {
                    return Some(format!("its ELF interpreter is {i}"));
                }
                let from = runpath.iter().find(|r| r.contains(NIX_STORE))?;
                const NAMED: usize = 5;
                let libraries = match needed.len() {
                    0 => "libraries".to_owned(),
                    n if n <= NAMED => needed.join(", "),
                    n => format!("{} and {} more", needed[..NAMED].join(", "), n - NAMED),
                };
                Some(format!("it loads {libraries} from {from}"))
            }
            Linkage::Script { interpreter } if interpreter.starts_with(NIX_STORE) => {
                Some(format!("its interpreter is {interpreter}"))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Linkage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Linkage::Static => f.write_str("static ELF"),
            Linkage::Dynamic {
                interpreter,
                needed,
                ..
            } => {
                f.write_str("dynamic ELF")?;
                if let Some(i) = interpreter {
                    let place = if i.starts_with(NIX_STORE) {
                        "in /nix/store"
                    } else {
                        "outside /nix/store"
                    };
                    write!(f, ", interpreter {i} ({place})")?;
                }
                if !needed.is_empty() {
                    write!(f, ", needs {}", needed.join(", "))?;
                }
                Ok(())
            }
            Linkage::Script { interpreter } => write!(f, "script for {interpreter}"),
            Linkage::Other => f.write_str("not an ELF or a script"),
        }
    }
}

/// Inspects an extracted file.
pub fn inspect(file: &mut File) -> io::Result<Linkage> {
    file.rewind()?;
    let mut head = [0u8; SHEBANG_MAX];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    if let Some(rest) = head.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        let interpreter = String::from_utf8_lossy(line).trim().to_owned();
        return Ok(Linkage::Script { interpreter });
    }
    if !head.starts_with(b"\x7fELF") || head.len() < 5 {
        return Ok(Linkage::Other);
    }
    file.rewind()?;
    let cache = ReadCache::new(&*file);
    let linkage = match head[4] {
        elf::ELFCLASS64 => elf_linkage::<elf::FileHeader64<Endianness>, _>(&cache),
        elf::ELFCLASS32 => elf_linkage::<elf::FileHeader32<Endianness>, _>(&cache),
        _ => None,
    };
    Ok(linkage.unwrap_or(Linkage::Other))
}

fn elf_linkage<'data, Elf, R>(data: R) -> Option<Linkage>
where
    Elf: FileHeader<Endian = Endianness>,
    R: ReadRef<'data>,
{
    let file = ElfFile::<Elf, R>::parse(data).ok()?;
    let endian = file.endian();
    let mut interpreter = None;
    for ph in file.elf_program_headers() {
        if ph.p_type(endian) == elf::PT_INTERP {
            if let Ok(Some(i)) = ph.interpreter(endian, data) {
                interpreter = Some(String::from_utf8_lossy(i).into_owned());
            }
        }
    }
    let mut needed = Vec::new();
    let mut runpath = Vec::new();
    let sections = file.elf_section_table();
    if let Ok(Some((dynamic, link))) = sections.dynamic(endian, data) {
        if let Ok(strings) = sections.strings(endian, data, link) {
            for d in dynamic {
                let Some(tag) = d.tag32(endian) else { continue };
                let Some(s) = d.val32(endian).and_then(|v| strings.get(v).ok()) else {
                    continue;
                };
                let s = String::from_utf8_lossy(s).into_owned();
                match tag {
                    elf::DT_NEEDED => needed.push(s),
                    elf::DT_RUNPATH | elf::DT_RPATH => {
                        runpath.extend(s.split(':').map(str::to_owned))
                    }
                    _ => {}
                }
            }
        }
    }
    if interpreter.is_none() && needed.is_empty() {
        Some(Linkage::Static)
    } else {
        Some(Linkage::Dynamic {
            interpreter,
            needed,
            runpath,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(interpreter: &str, needed: &[&str], runpath: &[&str]) -> Linkage {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Linkage::Dynamic {
            interpreter: Some(interpreter.to_owned()),
            needed: strings(needed),
            runpath: strings(runpath),
        }
    }

    #[test]
    fn what_a_program_needs_from_the_store_is_named() {
        const LD: &str = "/lib64/ld-linux-x86-64.so.2";
        const STORE_LD: &str = "/nix/store/ylm3qg2h7mq8ib8cbaxz9gjqd6vqhcz8-glibc-2.40/lib/ld.so";
        const LIB: &str = "/nix/store/0c1f0cy5l8csgrn2h1mp5jm8zmb8pgl3-zlib/lib";
        let cases = [
            (
                dynamic(STORE_LD, &[], &[]),
                Some(format!("its ELF interpreter is {STORE_LD}")),
            ),
            (
                dynamic(LD, &["libz.so.1", "libc.so.6"], &["/opt/lib", LIB]),
                Some(format!("it loads libz.so.1, libc.so.6 from {LIB}")),
            ),
            (
                dynamic(LD, &["a", "b", "c", "d", "e", "f", "g"], &[LIB]),
                Some(format!("it loads a, b, c, d, e and 2 more from {LIB}")),
            ),
            (
                dynamic(LD, &[], &[LIB]),
                Some(format!("it loads libraries from {LIB}")),
            ),
            (dynamic(LD, &["libc.so.6"], &["/opt/lib"]), None),
            (
                Linkage::Script {
                    interpreter: "/nix/store/x-bash/bin/bash -e".to_owned(),
                },
                Some("its interpreter is /nix/store/x-bash/bin/bash -e".to_owned()),
            ),
            (
                Linkage::Script {
                    interpreter: "/bin/sh".to_owned(),
                },
                None,
            ),
            (Linkage::Static, None),
        ];
        for (linkage, want) in cases {
            assert_eq!(linkage.needs_nix_store(), want, "{linkage:?}");
        }
    }
}
