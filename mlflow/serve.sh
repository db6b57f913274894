#!/usr/bin/env bash
# Start a local MLflow tracking server for segsde runs: sqlite backend and artifact root under
# ${SEGSDE_MLFLOW_DIR:-outputs/mlflow}, bound to 127.0.0.1 (reach it from elsewhere through SSH port forwarding).
#   mlflow/serve.sh [PORT]        then: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
# For a cluster head node, set HOST=0.0.0.0 and ALLOWED_HOSTS to the names clients use.
set -euo pipefail
port="${1:-5000}"
dir="$(realpath -m "${SEGSDE_MLFLOW_DIR:-outputs/mlflow}")"
mkdir -p "$dir/artifacts"
args=(--backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "$dir/artifacts"
      --host "${HOST:-127.0.0.1}" --port "$port" --workers 1)
[ -n "${ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$ALLOWED_HOSTS")
exec mlflow server "${args[@]}"
