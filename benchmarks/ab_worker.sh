#!/usr/bin/env bash
# The fused worker of two revisions, measured the same way: this checkout's bench (its load
# generator, its clock, its count of the worker's CPU) drives OLD's worker and NEW's in turn,
# against one local broker that this script starts and stops. Machines here are shared and
# noisy: compare the ratios of runs made side by side, never figures from different runs.
#
#   benchmarks/ab_worker.sh OLD NEW [ROUNDS] [REQUESTS]
#
# OLD, NEW: git revisions, or directories holding a tree of the repository (the device has
# no git: benchmarks/device/ab_worker.sh). Each round runs `sluice bench --mode fused
# --requests REQUESTS` once with each side's worker, the order swapped every round (drift
# on the machine falls on both sides alike); the worker runs in its side's tree, so it
# imports that side's `pipeline`. One JSON line per run, then a summary: the medians and
# each pair's NEW / OLD of throughput and of the worker's CPU per request.
# PYTHON: the interpreter (default: the Makefile's virtualenv); SLUICE_CACHE_DIR: where the
# Kafka runtime is.
set -euo pipefail
old=${1:?old revision or tree}; new=${2:?new revision or tree}
rounds=${3:-3}; requests=${4:-150000}
repo=$(cd "$(dirname "$0")/.." && pwd)
export SLUICE_CACHE_DIR=${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}
python=${PYTHON:-$(ls -d "$SLUICE_CACHE_DIR"/venv-*/bin/python | head -1)}
work=$(mktemp -d)
sluice() { (cd "$repo" && SLUICE_CACHE_DIR="$work/cache" "$python" -m pipeline.cli "$@"); }
cleanup() {
  sluice broker stop >/dev/null 2>&1 || true
  for side in old new; do
    if [ -e "$work/$side/.git" ]; then git -C "$repo" worktree remove --force "$work/$side"; fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
tree() {  # a side's tree: the directory itself, or the revision checked out in $work
  if [ -d "$1" ]; then (cd "$1" && pwd); return; fi
  git -C "$repo" worktree add -q --detach "$work/$2" "$1" && echo "$work/$2"
}
declare -A dir=([old]=$(tree "$old" old) [new]=$(tree "$new" new))
# One broker for every run, its state outside both trees (the Kafka runtime is shared).
mkdir -p "$work/cache"
ln -s "$SLUICE_CACHE_DIR"/kafka-* "$work/cache/"
sluice broker start >/dev/null
bootstrap=$(sluice broker status | sed 's/.*bootstrap=//')
# The demo model alone (`sluice model init-demo` would install MiniLM too).
(cd "$repo" && "$python" -c 'import sys, pathlib, pipeline.models as m; m.init_demo(pathlib.Path(sys.argv[1]))' "$work/models")
results="$work/results.jsonl"
for round in $(seq 1 "$rounds"); do
  order="old new"; [ $((round % 2)) = 0 ] && order="new old"
  for side in $order; do
    # This checkout's bench (first on the path); its worker, `python -m pipeline.cli`
    # started in the side's tree, imports the side's `pipeline`.
    line=$(cd "${dir[$side]}" && SLUICE_BOOTSTRAP="$bootstrap" SLUICE_MODEL_DIR="$work/models" \
      "$python" -c "import sys; sys.path.insert(0, sys.argv.pop(1)); from pipeline.cli import main; main()" \
      "$repo" bench --mode fused --requests "$requests" --json --no-progress 2>/dev/null | tail -1)
    printf '%s' "$line" | "$python" -c '
import json, sys
run = json.load(sys.stdin)
keep = ("throughput_rps", "worker_cpu_us_per_request", "wrong_outputs", "mean_batch_size")
print(json.dumps({"round": int(sys.argv[1]), "side": sys.argv[2], **{k: run[k] for k in keep}}))
' "$round" "$side" | tee -a "$results"
  done
done
"$python" - "$results" <<'PY'
import json, statistics, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
runs = {(r["round"], r["side"]): r for r in rows}
rounds = sorted({r["round"] for r in rows})
out = {}
for key in ("throughput_rps", "worker_cpu_us_per_request"):
    out[key] = {s: round(statistics.median(runs[n, s][key] for n in rounds), 2) for s in ("old", "new")}
    pairs = [runs[n, "new"][key] / runs[n, "old"][key] for n in rounds]
    out[key]["new_over_old_by_round"] = [round(p, 3) for p in pairs]
    out[key]["new_over_old_median"] = round(statistics.median(pairs), 3)
out["wrong_outputs"] = sum(r["wrong_outputs"] for r in rows)
print(json.dumps(out))
PY
