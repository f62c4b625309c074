#!/usr/bin/env bash
# Compares `binplz extract --nar FILE.nar.zst bin/hello` with Nix's own way of getting one
# file out of a compressed NAR, `zstd -dc FILE.nar.zst | nix nar cat /dev/stdin /bin/hello`
# (Nix reads the whole NAR into memory first), on the same generated NAR: wall time and
# maximum resident set size from `/usr/bin/time -v`, median of several runs.
#
# The input is the benchmark's own (`cargo bench --bench extract` with
# BINPLZ_BENCH_WRITE_INPUTS), so it is the same ELF-like mix, zstd -19 in 16 MiB frames.
#
# Environment: NARCAT_SIZE (MB of NAR, default 150), NARCAT_RUNS (default 5),
# NARCAT_DIR (where the input and outputs go, default target/bench-inputs/nix-nar-cat).
#
# Exits with 2 when binplz is not at least 3x faster.
#
# For the pipeline, /usr/bin/time reports the largest single process of the pipeline
# (`nix`), not the sum: zstd's own few MiB are left out, which only favours Nix.
set -euo pipefail

cd "$(dirname "$0")/.."
size=${NARCAT_SIZE:-150}
runs=${NARCAT_RUNS:-5}
dir=${NARCAT_DIR:-target/bench-inputs/nix-nar-cat}
wanted=bin/hello
export NIX_CONFIG=$'experimental-features = nix-command'

if [ ! -x /usr/bin/time ]; then
    apt-get install -y time >/dev/null
fi
for tool in nix zstd sha256sum; do
    command -v "$tool" >/dev/null || { echo "nix-nar-cat.sh: $tool is missing" >&2; exit 1; }
done

cargo build --release --quiet
binplz=$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/binplz

mkdir -p "$dir"
info=$(BINPLZ_BENCH_SIZES=$size BINPLZ_BENCH_CODECS=zstd BINPLZ_BENCH_WRITE_INPUTS=$dir \
    cargo bench --quiet --bench extract 2>/dev/null | grep '\.nar\.zst ')
nar=${info%% *}
nar_size=$(sed -n 's/.* nar_size=\([0-9]*\).*/\1/p' <<<"$info")
nar_hash=$(sed -n 's/.* nar_hash=\([^ ]*\).*/\1/p' <<<"$info")
want_sha=$(sed -n 's/.* wanted_sha256=\([0-9a-f]*\).*/\1/p' <<<"$info")
[ -f "$nar" ] && [ -n "$want_sha" ] || { echo "nix-nar-cat.sh: no input written" >&2; exit 1; }

# One run under `/usr/bin/time -v`: prints "SECONDS KIB" and checks the extracted file.
# time -v reports wall time in 10 ms steps, so the wall time is taken around it in
# microseconds instead (the difference is the fork of `time` itself).
measure() {
    local out=$1
    shift
    rm -f "$out"
    local start=$EPOCHREALTIME
    /usr/bin/time -v -o "$dir/time.txt" "$@" >/dev/null 2>>"$dir/stderr.txt"
    local end=$EPOCHREALTIME
    local got
    got=$(sha256sum "$out" | cut -d' ' -f1)
    if [ "$got" != "$want_sha" ]; then
        echo "nix-nar-cat.sh: $out has sha256 $got, expected $want_sha" >&2
        exit 1
    fi
    awk -F': ' -v start="$start" -v end="$end" '
        /Maximum resident set size/ { kib = $2 }
        END { printf "%.4f %d\n", end - start, kib }' "$dir/time.txt"
}

run_binplz() {
    measure "$dir/out.binplz" "$binplz" extract --nar "$nar" --nar-hash "$nar_hash" "$wanted" \
        -o "$dir/out.binplz"
}

run_nix() {
    measure "$dir/out.nix" sh -c 'zstd -dcq "$1" | nix nar cat /dev/stdin "/$2" > "$3"' \
        sh "$nar" "$wanted" "$dir/out.nix"
}

# Waits (up to 60 s) until the machine is quiet: other processes below 5 % of the CPU over
# half a second. Both commands use both cores, so a compile beside them skews the ratio.
wait_quiet() {
    local deadline=$((SECONDS + 60)) u n s i w q sq st b1 t1 b2 t2
    while [ $SECONDS -lt $deadline ]; do
        read -r _ u n s i w q sq st _ </proc/stat
        b1=$((u + n + s + q + sq + st)) t1=$((u + n + s + q + sq + st + i + w))
        sleep 0.5
        read -r _ u n s i w q sq st _ </proc/stat
        b2=$((u + n + s + q + sq + st)) t2=$((u + n + s + q + sq + st + i + w))
        [ $((100 * (b2 - b1))) -lt $((5 * (t2 - t1))) ] && return 0
    done
    echo "nix-nar-cat.sh: the machine is still busy after 60 s: measuring anyway" >&2
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "input: $nar ($nar_size bytes of NAR, $(stat -c %s "$nar") bytes compressed), extracting $wanted"
: >"$dir/stderr.txt"
echo "$runs runs each after one warm-up, interleaved, each pair once the machine is quiet"
run_binplz >/dev/null
run_nix >/dev/null
: >"$dir/binplz.txt"
: >"$dir/nix.txt"
for i in $(seq "$runs"); do
    wait_quiet
    b=$(run_binplz)
    n=$(run_nix)
    echo "run $i: binplz ${b% *} s ${b#* } KiB | zstd -dc | nix nar cat ${n% *} s ${n#* } KiB"
    echo "$b" >>"$dir/binplz.txt"
    echo "$n" >>"$dir/nix.txt"
done

b_time=$(cut -d' ' -f1 "$dir/binplz.txt" | median)
b_rss=$(cut -d' ' -f2 "$dir/binplz.txt" | median)
n_time=$(cut -d' ' -f1 "$dir/nix.txt" | median)
n_rss=$(cut -d' ' -f2 "$dir/nix.txt" | median)
awk -v bt="$b_time" -v br="$b_rss" -v nt="$n_time" -v nr="$n_rss" -v size="$nar_size" 'BEGIN {
    printf "\n%-34s %9s %9s %11s\n", "median of runs", "wall s", "MB/s", "max RSS MB"
    printf "%-34s %9.3f %9.0f %11.1f\n", "binplz extract --nar (.nar.zst)", bt, size / bt / 1e6, br * 1024 / 1e6
    printf "%-34s %9.3f %9.0f %11.1f\n", "zstd -dc | nix nar cat", nt, size / nt / 1e6, nr * 1024 / 1e6
    printf "\nbinplz: %.2fx the speed of zstd -dc | nix nar cat, with %.1f%% of its memory (goal: >= 3x)\n", nt / bt, 100 * br / nr
    exit (nt / bt >= 3) ? 0 : 2
}'
