#!/usr/bin/env bash
# A short fuzz run of every target for CI (about 1.5 minutes in all on 2 cores: ~20 s of start-up and
# seed replay per target, then 10 s of fuzzing): fails if any target crashes.
# The long runs are by hand (fuzz/README.md records their exec counts).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import atheris" 2>/dev/null; then
  echo "fuzz/smoke.sh: atheris is not installed (pip install atheris); skipping the fuzz run" >&2
  exit 0
fi
seconds="${FSTQ_FUZZ_SMOKE_SECONDS:-10}"
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
python fuzz/run_fuzzers.py --seconds "$seconds" --workdir "$workdir" --log "$workdir/libfuzzer.log" || {
  status=$?
  echo "fuzz/smoke.sh: a target crashed; inputs are in fuzz/crashes-new/. libFuzzer's output:" >&2
  tail -n 60 "$workdir/libfuzzer.log" >&2
  exit "$status"
}
