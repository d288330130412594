#!/usr/bin/env bash
# Device call 2, within the 30 s the machine stays warm after call 1 (carry .device/kafka-*):
# the GPU models bench, its JSON under $OUT. SLUICE_BENCH_MODELS picks the variants
# (minilm-torch, minilm-onnx, bert-base-torch, bert-base-onnx; default all).
set -euo pipefail
BROKER=1 . "$(dirname "$0")/env.sh"
# WORKERS: one or more worker counts (e.g. "1 4"), one run each.
for w in ${WORKERS:-4}; do
  python -m pipeline.cli bench --scenario models --no-progress --workers "$w" \
    ${REQUESTS:+--requests "$REQUESTS"} | tee "${OUT:-/tmp}/models-gpu-w$w.log"
  tail -1 "${OUT:-/tmp}/models-gpu-w$w.log" > "${OUT:-/tmp}/models-gpu-w$w.json"
done
