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
                runpath,
                ..
            } => {
                if let Some(i) = interpreter.as_deref().filter(|i| i.starts_with(NIX_STORE)) {
                    return Some(format!("its ELF interpreter is {i}"));
                }
                runpath
                    .iter()
                    .find(|r| r.contains(NIX_STORE))
                    .map(|r| format!("it loads libraries from {r}"))
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
