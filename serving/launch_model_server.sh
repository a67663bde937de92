#!/usr/bin/env bash
# Serve uhga_tf exports with the real tensorflow_model_server.
#
#   serving/launch_model_server.sh [MODELS_DIR]
#
# MODELS_DIR (default /models) holds uhga/<version>/ as written by
#   python -m uhga_tf.export --checkpoint=WORKDIR --export_dir=MODELS_DIR/uhga
# gRPC on 8500, REST on 8501. Configuration files are read from the
# directory of this script (or $UHGA_SERVING_CONFIG_DIR); models.config must
# name base paths as seen by the server (/models/uhga in the Docker image).
set -euo pipefail

MODELS_DIR="${1:-/models}"
CONFIG_DIR="${UHGA_SERVING_CONFIG_DIR:-$(cd "$(dirname "$0")" && pwd)}"
GRPC_PORT="${GRPC_PORT:-8500}"
REST_PORT="${REST_PORT:-8501}"

if ! command -v tensorflow_model_server >/dev/null 2>&1; then
  echo "launch_model_server.sh: tensorflow_model_server not found;" \
       "use the Docker image (serving/Dockerfile) or" \
       "python -m uhga_tf.serve --model_base_path=${MODELS_DIR}/uhga" >&2
  exit 1
fi
if [[ ! -d "${MODELS_DIR}/uhga" ]]; then
  echo "launch_model_server.sh: no ${MODELS_DIR}/uhga directory" >&2
  exit 1
fi

exec tensorflow_model_server \
  --port="${GRPC_PORT}" \
  --rest_api_port="${REST_PORT}" \
  --model_config_file="${CONFIG_DIR}/models.config" \
  --model_config_file_poll_wait_seconds=60 \
  --file_system_poll_wait_seconds=2 \
  --enable_batching=true \
  --batching_parameters_file="${CONFIG_DIR}/batching.config" \
  --monitoring_config_file="${CONFIG_DIR}/monitoring.config" \
  --enable_model_warmup=true \
  "${@:2}"
