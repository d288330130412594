#!/usr/bin/env bash
# Device call 2 or later, after install.sh (nothing more to carry, no broker): where a JPEG
# batch's time goes in the worker without Kafka (benchmarks/bench_prepare.py), for each
# batch in BATCHES (default "128 256"), COMPILES ("eager default") and DECODES ("nvjpeg";
# "nvjpeg nvjpeg-forked" compares the two); JSON lines under $OUT as steps-<gpu>.json.
set -euo pipefail
. "$(dirname "$0")/env.sh"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
for decoder in ${DECODES:-nvjpeg}; do
  for compile in ${COMPILES:-eager default}; do
    for batch in ${BATCHES:-128 256}; do
      flag=()
      [ "$compile" = eager ] || flag=(--compile "$compile")
      SLUICE_BENCH_DECODE=$decoder python -m benchmarks.bench_prepare --batch "$batch" \
        --seconds "${SECONDS_EACH:-5}" "${flag[@]}" | tee -a "$OUT/steps-$gpu.json"
    done
  done
done
