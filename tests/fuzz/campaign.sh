#!/bin/sh
# The fuzz campaign (docs/fuzzing.md): every target, one after another, on one core.
#   tests/fuzz/campaign.sh [TARGET...]        (default: all targets)
#   RUNS=N (default 1000000 executions per target), MAX_TIME=S (default 5400 s, a cap)
# Per target: atheris runs RUNS inputs from a copy of tests/fuzz/corpus/TARGET, with its
# dictionary; a crash input is written to tests/fuzz/crashes/TARGET/ and the target is
# reported failed. Then the corpus is minimised (libFuzzer -merge=1: the seeds, plus only
# the inputs that add coverage) back into tests/fuzz/corpus/TARGET. The last
# status line of each run (executions, cov:, ft:) is appended to .cache/fuzz/summary.
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-1000000}
MAX_TIME=${MAX_TIME:-5400}
WORK=${FUZZ_WORK:-.cache/fuzz}
ALL="release_custom manifest release_targets grubenv layout config journal gpt"
targets=${*:-$ALL}
mkdir -p "$WORK"
failed=""

dict_of() {
    case "$1" in
        release_custom|release_targets|manifest|journal) echo tests/fuzz/dicts/json.dict ;;
        *) echo "tests/fuzz/dicts/$1.dict" ;;
    esac
}

for t in $targets; do
    corpus=tests/fuzz/corpus/$t
    crashes=tests/fuzz/crashes/$t
    work=$WORK/$t
    rm -rf "$work"
    mkdir -p "$work/corpus" "$work/merged" "$crashes"
    cp "$corpus"/* "$work/corpus/"
    case "$t" in gpt) max_len=65536 ;; *) max_len=16384 ;; esac
    args="-dict=$(dict_of "$t") -max_len=$max_len"
    echo "fuzz $t: $RUNS runs" >&2
    # shellcheck disable=SC2086
    if ! "$PY" -m tests.fuzz.run "$t" $args -runs="$RUNS" -max_total_time="$MAX_TIME" \
        -print_final_stats=1 -artifact_prefix="$crashes/" "$work/corpus" >"$work/log" 2>&1; then
        echo "fuzz $t: FAILED (a crash input is in $crashes/; log: $work/log)" >&2
        failed="$failed $t"
        continue
    fi
    line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/log" | tail -1)
    echo "$t $(date -u +%Y-%m-%dT%H:%M:%SZ) $line" >>"$WORK/summary"
    echo "fuzz $t: $line" >&2
    # Minimise: the seeds first (kept whatever they cover), then what adds coverage.
    cp "$corpus"/seed-* "$work/merged/"
    # shellcheck disable=SC2086
    "$PY" -m tests.fuzz.run "$t" $args -merge=1 "$work/merged" "$work/corpus" \
        >"$work/merge.log" 2>&1
    find "$corpus" -type f ! -name 'seed-*' -delete
    cp "$work/merged"/* "$corpus/"
    echo "fuzz $t: corpus $(find "$corpus" -type f | wc -l) files, $(du -sh "$corpus" | cut -f1)" >&2
done
if [ -n "$failed" ]; then
    echo "fuzz: crashes in:$failed" >&2
    exit 1
fi
