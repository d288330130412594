#!/usr/bin/env bash
# Device call 2, within the 30 s the machine stays warm after install.sh (carry
# .device/kafka-*): `sluice bench --scenario gpu` (BERT-base and ResNet-50, bare and through
# one fused worker) once per batch window, fixed then adaptive, in one call on one machine:
# the check that the adaptive window keeps batches as large at saturation. Each run's JSON
# goes under $OUT as gpu-window-<window>.json.
set -euo pipefail
BROKER=1 . "$(dirname "$0")/env.sh"
for window in ${WINDOWS:-fixed adaptive}; do
  SLUICE_BATCH_WINDOW=$window python -m pipeline.cli bench --scenario gpu --no-progress \
    ${REQUESTS:+--requests "$REQUESTS"} 2> >(tee "$OUT/gpu-window-$window.err" >&2) \
    | tee "$OUT/gpu-window-$window.log"
  tail -1 "$OUT/gpu-window-$window.log" > "$OUT/gpu-window-$window.json"
done
