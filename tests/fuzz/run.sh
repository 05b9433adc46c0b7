#!/usr/bin/env bash
# Coverage-guided fuzzing (atheris) of weightkit's parsers of untrusted files, one target after another.
#
#   tests/fuzz/run.sh                 # every target for 300 s
#   tests/fuzz/run.sh 60 header       # the header target for 60 s
#
# Targets: header (safetensors header + CheckpointReader), recipe (compress/merge/adapt recipes), adapter
# (PEFT adapter_config.json readers). Each keeps its corpus in $FUZZ_WORK/corpus-NAME (default
# /tmp/weightkit-fuzz), so a later run continues from it, and stops at its first finding, written to
# $FUZZ_WORK/NAME/crash-* (libFuzzer reproduces one with: python tests/fuzz/fuzz_NAME.py CRASH_FILE).
# Not part of the test suite (pytest collects test_*.py only); the property tests in tests/reliability/
# test_fuzz_*.py are.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
seconds="${1:-300}"
shift || true
targets=("${@:-header recipe adapter}")
python="${PYTHON:-$root/.venv/bin/python}"
work="${FUZZ_WORK:-/tmp/weightkit-fuzz}"

# atheris ships manylinux wheels (3.0.0 has cp311); it is a fuzzing tool, not a dependency of the package.
"$python" -c "import atheris" 2>/dev/null || "$python" -m pip install -q "atheris==3.0.0"

status=0
for target in ${targets[*]}; do
    mkdir -p "$work/$target"
    args=("$work/corpus-$target" "-max_total_time=$seconds" "-timeout=10" "-rss_limit_mb=4096")
    [ -f "$here/$target.dict" ] && args+=("-dict=$here/$target.dict")
    echo "== $target: ${seconds}s, log in $work/$target.log"
    # From the target's own directory, so libFuzzer writes crash-* files there.
    if (cd "$work/$target" && PYTHONPATH="$root/src" "$python" "$here/fuzz_$target.py" "${args[@]}") \
        >"$work/$target.log" 2>&1; then
        grep -E "^Done [0-9]+ runs" "$work/$target.log" || true
    else
        status=1
        echo "   FINDING: $(ls "$work/$target"/crash-* "$work/$target"/timeout-* "$work/$target"/oom-* 2>/dev/null | tail -1)"
        grep -A3 "Uncaught Python exception" "$work/$target.log" || tail -5 "$work/$target.log"
    fi
done
exit $status
