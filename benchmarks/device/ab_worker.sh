#!/usr/bin/env bash
# Device call 2, within the 30 s the machine stays warm after install.sh (carry
# .device/kafka-* and .device/old, the tree to compare with, made here by
# `mkdir -p .device/old && git archive REV | tar -x -C .device/old`): benchmarks/ab_worker.sh
# on the device machine's cores, where the broker and the load generator do not share the
# worker's: the old tree's fused worker against this one's, ROUNDS rounds of REQUESTS. Its
# lines go under $OUT as ab-worker-device.log, the summary last.
set -euo pipefail
. "$(dirname "$0")/env.sh"
PYTHON=python bash "$(dirname "$0")/../ab_worker.sh" .device/old . "${ROUNDS:-4}" \
  "${REQUESTS:-200000}" 2> >(tee "$OUT/ab-worker-device.err" >&2) | tee "$OUT/ab-worker-device.log"
