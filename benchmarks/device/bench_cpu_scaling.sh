#!/usr/bin/env bash
# Device call 2 or 3, within the 30 s the machine stays warm after install.sh (carry
# .device/kafka-*): the CPU scale-out run on the device host's cores, no GPU. The demo model
# through N = 1, 2, 4, 8 fused workers (WORKERS, default 8), one partition each, with the
# load split over several generator processes, then the bare relay at the largest N.
# JSON lists (the demo's request format). The JSON goes under $OUT.
set -euo pipefail
export CUDA_VISIBLE_DEVICES=""
BROKER=1 . "$(dirname "$0")/env.sh"
python -c "import os; from pathlib import Path; from pipeline.models import init_demo; init_demo(Path(os.environ['SLUICE_MODEL_DIR']))"
python -m pipeline.cli bench --mode fused --scaling --workers "${WORKERS:-8}" --no-progress \
  ${REQUESTS:+--requests "$REQUESTS"} ${GENERATORS:+--generators "$GENERATORS"} \
  2> >(tee "$OUT/cpu-scaling.err" >&2) | tee "$OUT/cpu-scaling.log"
tail -1 "$OUT/cpu-scaling.log" > "$OUT/cpu-scaling-$(nproc)cores.json"
