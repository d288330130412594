#!/usr/bin/env bash
# Device call 2, within the 30 s the machine stays warm after install.sh (carry .whl-img:
# nvidia-nvimgcodec-cu13 and nvidia-nvjpeg, fetched by prepare.sh): the GPU's hardware JPEG
# engines for image.decode nvimgcodec, beside torchvision's nvJPEG that the image has.
set -euo pipefail
pip install -q --no-index --no-deps --target /tmp/site .whl-img/*.whl 2>&1 | grep -v WARNING || true
PYTHONPATH=/tmp/site python -c "from nvidia import nvimgcodec; print('nvimgcodec', nvimgcodec.__version__)"
