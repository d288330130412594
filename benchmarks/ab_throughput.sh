#!/usr/bin/env bash
# Fused throughput of two revisions, alternated on one machine in one session (machines here
# are shared and noisy: compare ratios from one run, never figures from different runs).
#
#   benchmarks/ab_throughput.sh OLD_REV NEW_REV [ROUNDS] [REQUESTS]
#
# Each round runs `sluice bench --mode fused --requests REQUESTS` on OLD_REV, then on
# NEW_REV, against one local broker that this script starts and stops; one JSON line per
# run, then the medians. Uses the Makefile's virtualenv (run `make setup` first).
set -euo pipefail
old=${1:?old revision}; new=${2:?new revision}; rounds=${3:-3}; requests=${4:-200000}
repo=$(cd "$(dirname "$0")/.." && pwd)
export SLUICE_CACHE_DIR=${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}
python=$(ls -d "$SLUICE_CACHE_DIR"/venv-*/bin/python | head -1)
work=$(mktemp -d)
cleanup() {
  (cd "$repo" && PYTHONPATH="$repo" SLUICE_CACHE_DIR="$work/cache" "$python" -m pipeline.cli broker stop >/dev/null 2>&1) || true
  git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1 || true
  git -C "$repo" worktree remove --force "$work/new" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
git -C "$repo" worktree add -q --detach "$work/old" "$old"
git -C "$repo" worktree add -q --detach "$work/new" "$new"
# One broker for every run, its state outside both trees (the Kafka runtime is shared).
mkdir -p "$work/cache"
ln -s "$SLUICE_CACHE_DIR"/kafka-* "$work/cache/"
(cd "$repo" && PYTHONPATH="$repo" SLUICE_CACHE_DIR="$work/cache" "$python" -m pipeline.cli broker start >/dev/null)
bootstrap=$(cd "$repo" && PYTHONPATH="$repo" SLUICE_CACHE_DIR="$work/cache" "$python" -m pipeline.cli broker status | sed 's/.*bootstrap=//')
(cd "$repo" && PYTHONPATH="$repo" SLUICE_MODEL_DIR="$work/models" "$python" -m pipeline.cli model init-demo >/dev/null)
results="$work/results.jsonl"
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    line=$(cd "$work/$side" && PYTHONPATH="$work/$side" SLUICE_BOOTSTRAP="$bootstrap" \
      SLUICE_MODEL_DIR="$work/models" "$python" -m pipeline.cli bench --mode fused \
      --requests "$requests" --json --no-progress 2>/dev/null | tail -1)
    rps=$(printf '%s' "$line" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["throughput_rps"])')
    echo "{\"round\": $round, \"side\": \"$side\", \"rev\": \"$(git -C "$work/$side" rev-parse --short HEAD)\", \"throughput_rps\": $rps}" | tee -a "$results"
  done
done
"$python" - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {s: [r["throughput_rps"] for r in rows if r["side"] == s] for s in ("old", "new")}
med = {s: statistics.median(v) for s, v in by.items()}
print(json.dumps({"median_rps": med, "new_over_old": round(med["new"] / med["old"], 3), "runs": by}))
PY
