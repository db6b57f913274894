#!/usr/bin/env bash
# Start an MLflow tracking server on a segsde output directory: its sqlite store (OUT/mlflow.db, where
# tune/run_ablation.py and tune/run_sweep.py track by default) and artifact root (OUT/mlartifacts), bound to
# 127.0.0.1 (reach it from elsewhere through SSH port forwarding).
#   mlflow/serve.sh [PORT] [OUT]      defaults: 5000, ./outputs;  then open http://127.0.0.1:PORT
# Cluster head node: HOST=0.0.0.0 ALLOWED_HOSTS=<names clients use> (the server's Host-header allow-list),
# and put basic auth in front (MLFLOW_AUTH=1 uses mlflow's basic-auth app; credentials come from the
# environment, never from this repository).
set -euo pipefail
port="${1:-5000}"
out="$(realpath -m "${2:-outputs}")"
artifacts="${ARTIFACTS:-$out/mlartifacts}"   # on a cluster: ARTIFACTS=$SEGSDE_STORAGE/mlflow (the storage root)
[[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
args=(--backend-store-uri "sqlite:///$out/mlflow.db" --artifacts-destination "$artifacts"
      --host "${HOST:-127.0.0.1}" --port "$port" --workers 1)
[ -n "${ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$ALLOWED_HOSTS")
[ -n "${MLFLOW_AUTH:-}" ] && args+=(--app-name basic-auth)
exec mlflow server "${args[@]}"
