#!/usr/bin/env bash
# Device call 2 on a host with several GPUs (kind nvidia-h100-x2 or larger; carry
# .device/kafka-*), within the 30 s the machine stays warm after install.sh: BERT-base and
# ResNet-50 through one fused worker per GPU, for N = 1, 2, 4, 8 up to GPUS (default: every
# GPU), in one run. The whole JSON and one file per N (with `gpus` and `scaling_efficiency`)
# go under $OUT.
set -euo pipefail
BROKER=1 . "$(dirname "$0")/env.sh"
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
python -m pipeline.cli bench --scenario gpu --gpus "$GPUS" --no-progress \
  ${REQUESTS:+--requests "$REQUESTS"} ${GENERATORS:+--generators "$GENERATORS"} \
  2> >(tee "$OUT/gpu-scaling.err" >&2) | tee "$OUT/gpu-scaling.log"
tail -1 "$OUT/gpu-scaling.log" > "$OUT/gpu-scaling-$CARD-x$GPUS.json"
python - "$OUT/gpu-scaling-$CARD-x$GPUS.json" "$CARD" "$*" <<'PY'
import json, sys
from pathlib import Path
path, card = Path(sys.argv[1]), sys.argv[2]
result = json.loads(path.read_text())
for run in result["runs"]:
    one = {k: v for k, v in result.items() if k != "runs"}
    one.update(gpus=run["gpus"], models=run["models"],
               scaling_efficiency={m: f["scaling_efficiency"] for m, f in run["models"].items()})
    (path.parent / f"{path.stem}-g{run['gpus']}.json").write_text(json.dumps(one, indent=2) + "\n")
    print(run["gpus"], json.dumps(one["scaling_efficiency"]), {m: f["pipeline_rps"] for m, f in run["models"].items()})
PY
