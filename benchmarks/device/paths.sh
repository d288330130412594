#!/usr/bin/env bash
# Device call 2 or later, after install.sh (nothing more to carry): every model path a
# config can name (eager with CUDA graphs, torch.compile, max-autotune, onnxruntime's CUDA
# and TensorRT providers), bare, for ResNet-50 and BERT-base (benchmarks/bench_paths.py).
set -euo pipefail
. "$(dirname "$0")/env.sh"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
python -m benchmarks.bench_paths --batch "${BATCH:-128}" ${PATHS_WANTED:+--paths "$PATHS_WANTED"} \
  | tee "$OUT/paths-$gpu.log"
tail -1 "$OUT/paths-$gpu.log" > "$OUT/paths-$gpu.json"
