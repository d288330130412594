#!/usr/bin/env bash
# Device call 3 (carry .device/kafka-*): the local broker with the seeded JPEG images as
# records, per compression (benchmarks/bench_decode.py --broker), JSON under $OUT.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m benchmarks.bench_decode --skip-decode --broker --records "${RECORDS:-200000}" \
  | tee "$OUT/broker-bytes.log"
tail -1 "$OUT/broker-bytes.log" > "$OUT/broker-bytes.json"
