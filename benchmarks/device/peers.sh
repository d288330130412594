#!/usr/bin/env bash
# Device call 2, within the 30 s the machine stays warm after install.sh (carry
# .device/kafka-*): `python -m benchmarks.peers` on the device machine's cores, where the
# broker, the load generator and the system measured each have cores of their own (on the
# 2-core machine they share two). The Quix peer is left out by default: its virtualenv is
# installed from the package index, which the device cannot reach. The JSON line goes under
# $OUT as peers-device.json.
set -euo pipefail
BROKER=1 . "$(dirname "$0")/env.sh"
python -m benchmarks.peers --systems "${SYSTEMS:-relay,guarded,fused,split}" \
  ${REQUESTS:+--requests "$REQUESTS"} 2> >(tee "$OUT/peers-device.err" >&2) \
  | tee "$OUT/peers-device.log"
tail -1 "$OUT/peers-device.log" > "$OUT/peers-device.json"
