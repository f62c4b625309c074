#!/bin/sh
# Rebuilds fuzz/seeds/ from fixtures/ (see README.md). Needs zstd, xz, bzip2, gzip and
# python3 with `cryptography` (to sign the extra narinfo with the fixtures' test key).
set -eu
cd "$(dirname "$0")"
fx=../fixtures
mkdir -p seeds/nar_reader seeds/narinfo seeds/ls

# nar_reader: the fixture cache's NARs, decompressed (not busybox's: 1 MB, and no new shapes).
for f in "$fx"/cache/nar/*.nar.zst; do
    [ "$(stat -c %s "$f")" -lt 100000 ] || continue
    zstd -qfd "$f" -o "seeds/nar_reader/$(basename "$f" .zst)"
done

# Found by the nar_reader target's properties: a NAR as deep as the reader allows (64
# levels), whose listing the .ls parser refused.
python3 - <<'PY'
import struct
def s(*tokens):
    return b"".join(struct.pack("<Q", len(t)) + t + bytes(-len(t) % 8) for t in tokens)
node = s(b"(", b"type", b"regular", b"contents", b"x", b")")
for _ in range(64):
    node = s(b"(", b"type", b"directory", b"entry", b"(", b"name", b"d", b"node") + node + s(b")", b")")
open("seeds/nar_reader/regress-deepest.nar", "wb").write(s(b"nix-archive-1") + node)
PY

# narinfo: every fixture narinfo, plus spellings and a signed narinfo with three References.
for f in "$fx"/cache*/*.narinfo; do
    cp "$f" "seeds/narinfo/$(basename "$(dirname "$f")")-$(basename "$f")"
done
python3 - "$fx" <<'PY'
import base64, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
fx = sys.argv[1]
A = "0123456789abcdfghijklmnpqrsvwxyz"
def nix32_decode(s):
    out = bytearray(len(s) * 5 // 8)
    for n, c in enumerate(reversed(s)):
        d, b = A.index(c), n * 5
        i, j = b // 8, b % 8
        out[i] |= (d << j) & 0xff
        if i + 1 < len(out):
            out[i + 1] |= d >> (8 - j)
    return bytes(out)
def read(name):
    return open(f"{fx}/cache/{name}.narinfo").read()
def write(name, text):
    open(f"seeds/narinfo/{name}", "w", newline="").write(text)
hello = read("ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d")
nar_hash = next(l for l in hello.splitlines() if l.startswith("NarHash: "))
digest = nix32_decode(nar_hash.split(":")[2])
write("hello-hex.narinfo", hello.replace(nar_hash, "NarHash: sha256:" + digest.hex()))
write("hello-sri.narinfo", hello.replace(nar_hash, "NarHash: sha256-" + base64.b64encode(digest).decode()))
write("hello-crlf.narinfo", hello.replace("\n", "\r\n"))
write("hello-no-compression.narinfo", "".join(l for l in hello.splitlines(True) if not l.startswith("Compression:")))
links = read("fr4l0hfh1lp5pd5df98fgz2m3jczb119")
write("links-absolute-refs.narinfo", links.replace("References: ", "References: /nix/store/"))
# Three references, signed with the fixtures' key over Nix's fingerprint.
secret = open(f"{fx}/keys/binplz-test-1.secret").read().strip().split(":", 1)[1]
key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(secret)[:32])
refs = ["zpya58m9bxib49ddjq6jdk22xiy6219w-busybox", "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0",
        "z9y818yk8b0ybiz3b92lavnzvkra3i0m-goodbye-1.0"]
lines = [l for l in links.splitlines() if not l.startswith(("References:", "Sig:"))]
field = lambda k: next(l for l in lines if l.startswith(k + ": ")).split(": ", 1)[1]
fp = "1;%s;%s;%s;%s" % (field("StorePath"), field("NarHash"), field("NarSize"),
                        ",".join(sorted("/nix/store/" + r for r in refs)))
sig = base64.b64encode(key.sign(fp.encode())).decode()
# Found by the narinfo target's property: a value ending in CR.
write("regress-url-ends-in-cr.narinfo", hello.replace(".nar.zst\n", ".nar.zst\r\r\n"))
write("links-three-refs.narinfo", "\n".join(lines + ["References: " + " ".join(refs),
                                                      "Sig: binplz-test-1:" + sig]) + "\n")
PY

# ls: every fixture listing, and the largest compressed in each format a cache may serve
# without Content-Encoding (brotli: the cache-br NAR, for the brotli fallback's decoder).
cp "$fx"/cache/*.ls seeds/ls/
big="$fx/cache/fr4l0hfh1lp5pd5df98fgz2m3jczb119.ls"
zstd -qf -19 -c "$big" > seeds/ls/links.ls.zst
xz -c "$big" > seeds/ls/links.ls.xz
bzip2 -c "$big" > seeds/ls/links.ls.bz2
gzip -n -c "$big" > seeds/ls/links.ls.gz
cp "$fx"/cache-br/nar/*.nar.br seeds/ls/hello.nar.br
# Found by the ls target's properties: sizes whose sum overflows u64, and the deepest
# listing the NAR reader allows (64 levels), which the JSON parser's own limit refused.
big=$((1 << 63))
printf '{"version":1,"root":{"type":"directory","entries":{"a":{"type":"regular","size":%s},"b":{"type":"regular","size":%s}}}}' \
    "${big#-}" "${big#-}" > seeds/ls/regress-overflow.ls
node='{"type":"regular","size":1,"narOffset":8800}'
i=0
while [ $i -lt 64 ]; do node="{\"type\":\"directory\",\"entries\":{\"d\":$node}}"; i=$((i + 1)); done
printf '{"version":1,"root":%s}' "$node" > seeds/ls/regress-deepest.ls
