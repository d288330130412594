#!/usr/bin/env bash
# Device call 3 (carry .device/kafka-*), after install.sh and install_img.sh: the JPEG run
# (`sluice bench --scenario jpeg`: ResNet-50 on JPEG bytes decoded on the GPU, BERT-base,
# each bare and through Kafka, p99 in three runs), once per decoder in DECODES (auto,
# nvjpeg, nvjpeg-forked, nvimgcodec, cpu; default "auto"), and once per worker count in
# WORKERS (worker processes sharing the GPU; default "1"), JSON under $OUT as
# jpeg-<gpu>-<decoder>[-w<workers>].json: DECODES="nvjpeg nvjpeg-forked" compares the two
# decoders on one machine, WORKERS="1 2" one worker against two.
# COMPILE=max-autotune (or default) runs the models through torch.compile; the bench's
# SLUICE_BENCH_* variables (bench_jpeg.py) pass through. PROFILE=1 (carry
# .device/py-spy too, the static binary) samples every process of the run into
# $OUT/<name>.pyspy.gz (collapsed stacks, threads apart); PROFILE_ARGS (default
# --nonblocking) replaces py-spy's sampling options ("--native --idle", say).
set -euo pipefail
BROKER=1 . "$(dirname "$0")/env.sh"
LD_LIBRARY_PATH=$( (find /tmp/site/nvidia -type d -name lib 2>/dev/null || true) | paste -sd: -)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
for decoder in ${DECODES:-auto}; do
for workers in ${WORKERS:-1}; do
  w=; [ "$workers" = 1 ] || w=-w$workers
  name="jpeg-$gpu-$decoder${COMPILE:+-$COMPILE}${SLUICE_BENCH_RESNET_BATCH:+-b$SLUICE_BENCH_RESNET_BATCH}$w"
  spy=()
  if [ "${PROFILE:-0}" = 1 ]; then
    # shellcheck disable=SC2206  # options, split on purpose
    spy=(.device/py-spy record --subprocesses --threads ${PROFILE_ARGS:---nonblocking} -r 79 -f raw -o "$OUT/$name.pyspy" --)
  fi
  SLUICE_BENCH_DECODE=$decoder SLUICE_BENCH_COMPILE=${COMPILE:-} \
    "${spy[@]}" python -m pipeline.cli bench --scenario jpeg --no-progress --workers "$workers" \
    ${REQUESTS:+--requests "$REQUESTS"} 2> >(tee "$OUT/$name.err" >&2) | tee "$OUT/$name.log"
  tail -1 "$OUT/$name.log" > "$OUT/$name.json"
  if [ "${PROFILE:-0}" = 1 ]; then gzip -f "$OUT/$name.pyspy"; fi  # fits what a call brings back
done
done
