#!/usr/bin/env bash
# Device call 2, within the 30 s the machine stays warm after install.sh (carry .whl-img:
# nvidia-nvimgcodec-cu13 and nvidia-nvjpeg, fetched by prepare.sh): every JPEG decode path
# on the seeded image set (benchmarks/bench_decode.py), JSON under $OUT. Then call 3
# (carry .device/kafka-*): benchmarks/device/broker_bytes.sh.
set -euo pipefail
pip install -q --no-index --no-deps --target /tmp/site .whl-img/*.whl 2>&1 | grep -v WARNING || true
export PYTHONPATH=/tmp/site:$PWD
LD_LIBRARY_PATH=$(find /tmp/site/nvidia -type d -name lib 2>/dev/null | paste -sd: -)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
OUT=${OUT:-/tmp}
python -m benchmarks.bench_decode --images "${IMAGES:-2048}" --batch "${BATCH:-256}" \
  | tee "$OUT/decode.log"
tail -1 "$OUT/decode.log" > "$OUT/decode-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]').json"
