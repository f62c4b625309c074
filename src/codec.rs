//! Decompressors for the codecs binary caches write, each with bounded memory.
//!
//! The decoder's output is capped by the caller (at NarSize + 1 bytes), so a decompression
//! bomb costs at most that much CPU and no more memory than the limits below.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

/// Memory liblzma may use. xz `-9` needs 65 MiB to decode; Nix writes `-6` (9 MiB).
pub const XZ_MEMORY_LIMIT: u64 = 128 << 20;

/// Largest zstd window accepted (2^27 = 128 MiB): zstd's default decoder limit, and far
/// above the 8 MiB window of level 19. `--long=31` archives are refused.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Brotli's largest standard window is 16 MiB; the decoder's buffer below is separate.
const BROTLI_BUFFER: usize = 64 << 10;

/// Buffer for reading the compressed stream.
const INPUT_BUFFER: usize = 128 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    None,
    Xz,
    Zstd,
    Bzip2,
    Brotli,
    Gzip,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("unsupported compression {0:?}")]
    Unsupported(String),
    #[error("cannot tell the compression of this file from its first bytes")]
    Unrecognised,
}

impl Codec {
    /// The codec named by a narinfo's `Compression` field; missing or empty means bzip2,
    /// as in Nix.
    pub fn from_narinfo(name: Option<&str>) -> Result<Codec, CodecError> {
        match name.unwrap_or("") {
            "" | "bzip2" => Ok(Codec::Bzip2),
            "none" => Ok(Codec::None),
            "xz" => Ok(Codec::Xz),
            "zstd" => Ok(Codec::Zstd),
            "br" => Ok(Codec::Brotli),
            "gzip" => Ok(Codec::Gzip),
            other => Err(CodecError::Unsupported(other.to_owned())),
        }
    }

    /// Detects the codec from a file's first bytes. Brotli has no magic number: it is
    /// recognised only by a `.br` file name (`name_hint`).
    pub fn sniff(head: &[u8], name_hint: Option<&str>) -> Result<Codec, CodecError> {
        const NAR: &[u8] = b"\x0d\0\0\0\0\0\0\0nix-archive-1";
        if head.starts_with(b"\x28\xb5\x2f\xfd") {
            Ok(Codec::Zstd)
        } else if head.starts_with(b"\xfd7zXZ\0") {
            Ok(Codec::Xz)
        } else if head.starts_with(b"BZh") {
            Ok(Codec::Bzip2)
        } else if head.starts_with(b"\x1f\x8b") {
            Ok(Codec::Gzip)
        } else if head.starts_with(NAR)
            || (head.len() < NAR.len() && NAR.starts_with(head) && !head.is_empty())
        {
            Ok(Codec::None)
        } else if name_hint.is_some_and(|n| n.ends_with(".br")) {
            Ok(Codec::Brotli)
        } else {
            Err(CodecError::Unrecognised)
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Xz => "xz",
            Codec::Zstd => "zstd",
            Codec::Bzip2 => "bzip2",
            Codec::Brotli => "br",
            Codec::Gzip => "gzip",
        }
    }

    /// Wraps `input` in this codec's decoder. Every multi-member format is decoded to its
    /// end: all zstd frames (Nix 2.35+ writes 16 MiB frames), all bzip2 streams (pbzip2),
    /// all gzip members.
    pub fn decoder<'a, R: Read + Send + 'a>(
        self,
        input: R,
    ) -> io::Result<Box<dyn Read + Send + 'a>> {
        let input = BufReader::with_capacity(INPUT_BUFFER, input);
        Ok(match self {
            Codec::None => Box::new(input),
            Codec::Xz => {
                let stream = liblzma::stream::Stream::new_stream_decoder(
                    XZ_MEMORY_LIMIT,
                    liblzma::stream::CONCATENATED,
                )
                .map_err(io::Error::other)?;
                Box::new(liblzma::bufread::XzDecoder::new_stream(input, stream))
            }
            Codec::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(input)?;
                d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
                Box::new(d)
            }
            Codec::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(input)),
            Codec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            Codec::Brotli => Box::new(brotli_decompressor::Decompressor::new(input, BROTLI_BUFFER)),
        })
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Peeks at the first bytes of a buffered reader without consuming them.
pub fn sniff_reader<R: BufRead>(
    r: &mut R,
    name_hint: Option<&str>,
) -> io::Result<Result<Codec, CodecError>> {
    let head = r.fill_buf()?;
    Ok(Codec::sniff(&head[..head.len().min(32)], name_hint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn decode(codec: Codec, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        codec.decoder(data)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn narinfo_names_map_to_codecs_and_missing_means_bzip2() {
        assert_eq!(Codec::from_narinfo(None), Ok(Codec::Bzip2));
        assert_eq!(Codec::from_narinfo(Some("")), Ok(Codec::Bzip2));
        for c in [
            Codec::None,
            Codec::Xz,
            Codec::Zstd,
            Codec::Bzip2,
            Codec::Brotli,
            Codec::Gzip,
        ] {
            assert_eq!(Codec::from_narinfo(Some(c.as_str())), Ok(c));
        }
        assert_eq!(
            Codec::from_narinfo(Some("lz4")),
            Err(CodecError::Unsupported("lz4".into()))
        );
    }

    #[test]
    fn sniffing_recognises_magic_numbers() {
        let nar = crate::nar::writer::write_nar(&crate::nar::writer::Entry::file("x"));
        assert_eq!(Codec::sniff(&nar, None), Ok(Codec::None));
        assert_eq!(
            Codec::sniff(&zstd::encode_all(&b"x"[..], 1).expect("zstd"), None),
            Ok(Codec::Zstd)
        );
        assert_eq!(Codec::sniff(b"\xfd7zXZ\0rest", None), Ok(Codec::Xz));
        assert_eq!(Codec::sniff(b"BZh91AY", None), Ok(Codec::Bzip2));
        assert_eq!(Codec::sniff(b"\x1f\x8b\x08", None), Ok(Codec::Gzip));
        assert_eq!(
            Codec::sniff(b"\x0b\x02\x80", Some("x.nar.br")),
            Ok(Codec::Brotli)
        );
        assert_eq!(
            Codec::sniff(b"garbage", Some("x.nar")),
            Err(CodecError::Unrecognised)
        );
    }

    #[test]
    fn every_zstd_frame_is_decoded() {
        let mut data = zstd::encode_all(&b"first frame;"[..], 3).expect("zstd");
        data.extend(zstd::encode_all(&b"second frame"[..], 19).expect("zstd"));
        assert_eq!(
            decode(Codec::Zstd, &data).expect("decodes"),
            b"first frame;second frame"
        );
    }

    #[test]
    fn every_bzip2_stream_is_decoded() {
        let enc = |s: &[u8]| {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
            e.write_all(s).expect("write");
            e.finish().expect("finish")
        };
        let mut data = enc(b"one;");
        data.extend(enc(b"two"));
        assert_eq!(decode(Codec::Bzip2, &data).expect("decodes"), b"one;two");
    }

    #[test]
    fn concatenated_xz_streams_and_gzip_members_are_decoded() {
        let xz = |s: &[u8]| {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(s).expect("write");
            e.finish().expect("finish")
        };
        let mut data = xz(b"a;");
        data.extend(xz(b"b"));
        assert_eq!(decode(Codec::Xz, &data).expect("decodes"), b"a;b");
        let gz = |s: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(s).expect("write");
            e.finish().expect("finish")
        };
        let mut data = gz(b"c;");
        data.extend(gz(b"d"));
        assert_eq!(decode(Codec::Gzip, &data).expect("decodes"), b"c;d");
    }

    #[test]
    fn zstd_windows_beyond_the_limit_are_refused() {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("encoder");
        e.set_parameter(zstd::zstd_safe::CParameter::WindowLog(
            ZSTD_WINDOW_LOG_MAX + 2,
        ))
        .expect("param");
        e.write_all(&[7u8; 4096]).expect("write");
        let data = e.finish().expect("finish");
        assert!(decode(Codec::Zstd, &data).is_err());
    }

    #[test]
    fn corrupt_streams_are_errors_not_panics() {
        for c in [
            Codec::Xz,
            Codec::Zstd,
            Codec::Bzip2,
            Codec::Brotli,
            Codec::Gzip,
        ] {
            let garbage: Vec<u8> = (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            assert!(decode(c, &garbage).is_err(), "{c} accepted garbage");
        }
    }
}
