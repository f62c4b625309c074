#!/usr/bin/env bash
# A cold miss from S3 against the same NAR over http://, both on loopback: `binplz extract`
# (which keeps nothing between runs, so every run is a cold miss: narinfo, NAR, decode,
# hash, verify) of one file from a store path built by Nix, timed by hyperfine.
#
#   http       nginx serving the binary cache directory (sendfile)
#   s3-nginx   the same nginx as the S3 endpoint (path-style /bench/KEY; it ignores the
#              signature): binplz's S3 client against its HTTP client, same server
#   s3s-fs     s3s-fs holding the same files in a bucket, checking SigV4 signatures
#   curl-s3s-fs  curl fetching just the NAR from s3s-fs: that server's own floor
#
# Goal: s3-nginx at least 0.9x the speed of http (the client's cost; a real S3 serves
# faster than s3s-fs, which reads in 4 KiB chunks and hashes each object before sending
# it). Prints hyperfine's table and the ratios.
#
# Environment: SIZE_MB (default 64) the file's size; ROUNDS (default 4) of RUNS (default 5).
# Needs: nix-bin, /bin/busybox, nginx, hyperfine, s3s-fs (see .ci/run), curl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE_MB=${SIZE_MB:-64}
RUNS=${RUNS:-5}
ROUNDS=${ROUNDS:-4}
export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters ='

cargo build --release --bin binplz >&2
binplz=$PWD/target/release/binplz
s3s_fs=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# A store path holding SIZE_MB of random bytes as bin/big (random: every byte crosses
# the transport; zstd stores it as is). The nonce makes each run build its own path.
mkdir "$work/bb"
cp /bin/busybox "$work/bb/busybox"
ln -s busybox "$work/bb/sh"
cat > "$work/big.nix" <<EOF
let dir = builtins.path { path = $work/bb; name = "bench-busybox"; }; in
derivation {
  name = "bench-big";
  system = "x86_64-linux";
  builder = "\${dir}/sh";
  args = [ "-c" "\${dir}/busybox mkdir -p \$out/bin && \${dir}/busybox head -c ${SIZE_MB}000000 /dev/urandom > \$out/bin/big && \${dir}/busybox chmod +x \$out/bin/big" ];
  nonce = "$(date +%s%N)";
}
EOF
out=$(nix-build "$work/big.nix" --no-out-link)
nix key generate-secret --key-name bench-1 > "$work/sk"
nix key convert-secret-to-public < "$work/sk" > "$work/pk"
nix copy --to "file://$work/cache?compression=zstd&secret-key=$work/sk" "$out"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "nothing listening on port $1" >&2
  exit 1
}

# http: nginx.
nport=$(free_port)
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<EOF
user root;
daemon off;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log stderr;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  server {
    listen 127.0.0.1:$nport;
    root $work/cache;
    location /bench/ { alias $work/cache/; }
  }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & pids+=($!)
wait_port "$nport"

# s3: s3s-fs, the same files in bucket "bench".
sport=$(free_port)
mkdir -p "$work/s3"
cp -r "$work/cache" "$work/s3/bench"
"$s3s_fs" --host 127.0.0.1 --port "$sport" --access-key bench --secret-key bench-secret "$work/s3" >/dev/null 2>&1 & pids+=($!)
wait_port "$sport"

key=$(cat "$work/pk")
nar=$(cd "$work/cache" && ls nar/*)
extract="$binplz extract --trusted-public-key $key $out bin/big"
creds="env AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret"
cmds=(
  http "$extract --upstream http://127.0.0.1:$nport -o $work/out-http"
  s3-nginx "$creds $extract --upstream 's3://bench?endpoint=127.0.0.1:$nport&scheme=http' -o $work/out-s3n"
  s3s-fs "$creds $extract --upstream 's3://bench?endpoint=127.0.0.1:$sport&scheme=http' -o $work/out-s3"
  curl-s3s-fs "curl -sf -o /dev/null -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' --aws-sigv4 aws:amz:us-east-1:s3 --user bench:bench-secret http://127.0.0.1:$sport/bench/$nar"
)
# The machine is shared: ROUNDS rounds of RUNS runs each, the commands' order reversed every
# other round, so that a load that comes and goes does not fall on one command only.
for round in $(seq 1 "$ROUNDS"); do
  args=()
  if [ $((round % 2)) -eq 1 ]; then order="0 2 4 6"; else order="6 4 2 0"; fi
  for i in $order; do args+=(-n "${cmds[$i]}" "${cmds[$((i + 1))]}"); done
  hyperfine --warmup 1 --runs "$RUNS" --export-json "$work/h$round.json" "${args[@]}" >&2
done
cmp "$work/out-http" "$work/out-s3n"
cmp "$work/out-http" "$work/out-s3"
python3 - "$SIZE_MB" "$work"/h*.json <<'EOF'
import json, statistics, sys
times = {}
for f in sys.argv[2:]:
    for x in json.load(open(f))["results"]:
        times.setdefault(x["command"], []).extend(x["times"])
r = {name: statistics.median(t) for name, t in times.items()}
mb = float(sys.argv[1])
for name, t in r.items():
    print(f"{name:12} {t * 1000:7.0f} ms  {mb / t:6.0f} MB/s (median of {len(times[name])})")
print(f"s3-nginx / http speed: {r['http'] / r['s3-nginx']:.2f}x (goal >= 0.9)")
print(f"s3s-fs / http speed:   {r['http'] / r['s3s-fs']:.2f}x "
      f"(s3s-fs alone sends the NAR in {r['curl-s3s-fs'] * 1000:.0f} ms)")
EOF
