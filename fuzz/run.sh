#!/bin/sh
# Runs every fuzz target (`cargo fuzz list`) one after another for SECONDS each (default 600),
# each from its committed seeds (seeds/<target>) and its working corpus (corpus/<target>),
# then prints one summary line per target. Exits non-zero if any target found a crash;
# the inputs are in artifacts/<target>/, each run's log in artifacts/<target>/run.log.
#
#   nice -n 19 fuzz/run.sh [SECONDS]
set -u
secs=${1:-600}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
cd "$(dirname "$0")" || exit 2

cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked || exit 2
targets=$(cargo +nightly fuzz list) || exit 2
cargo +nightly fuzz build || exit 2

summary=""
failed=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/run.log"
    before=$(ls "artifacts/$t" | grep -c -e '^crash-' -e '^oom-' -e '^timeout-' -e '^leak-')
    echo "== $t: ${secs}s" >&2
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1
    status=$?
    after=$(ls "artifacts/$t" | grep -c -e '^crash-' -e '^oom-' -e '^timeout-' -e '^leak-')
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    new=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -n 1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' "$log" | tail -n 1)
    found=$((after - before))
    if [ "$status" -ne 0 ] && [ "$found" -eq 0 ]; then
        found="? (exit $status, see $log)"
    fi
    [ "$status" -eq 0 ] || failed=1
    line=$(printf '%-12s %6ss  executions %-10s new units %-6s coverage %-6s crashes %s' \
        "$t" "$secs" "${execs:-?}" "${new:-?}" "${cov:-?}" "$found")
    echo "$line" >&2
    summary="$summary$line
"
done
printf '\n%s' "$summary"
exit "$failed"
