#!/usr/bin/env bash
# Run the suite N times (default 5) from one clean clone of this repository's HEAD and print one
# line per run: exit status, pytest's summary line, wall time. Not part of `make test`.
#   tests/e2e/soak.sh 5            # a clone under a fresh temporary folder, kept for inspection
# Before every run the clone is reset with `git clean -xdff` (everything untracked goes except the
# virtual environment, which the first run builds with `make test` like CI does), so each run
# starts from a clean checkout. Full logs: <clone>/../run<i>.log. Exits non-zero if any run failed.
set -uo pipefail
runs=${1:-5}
source_repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/camstudy-soak.XXXXXX")
git clone --quiet "$source_repo" "$work/clone"
echo "soak: $runs run(s) of make test in $work/clone at $(git -C "$work/clone" rev-parse --short HEAD)"
failed=0
for i in $(seq 1 "$runs"); do
  git -C "$work/clone" clean -xdff --quiet -e .venv
  started=$(date +%s)
  (cd "$work/clone" && make test PYTEST_ARGS="-ra -p no:cacheprovider") > "$work/run$i.log" 2>&1
  status=$?
  summary=$(grep -E '^=*.* (passed|failed|error)' "$work/run$i.log" | tail -n 1 | tr -d '=')
  crash=$(grep -m1 -E 'Segmentation fault|Fatal Python error' "$work/run$i.log")
  echo "run $i: exit $status; ${summary:-no pytest summary}; $(( $(date +%s) - started )) s${crash:+; $crash}"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
done
echo "soak: $((runs - failed)) of $runs run(s) exited 0 (logs in $work)"
[ "$failed" -eq 0 ]
