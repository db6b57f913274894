#!/usr/bin/env bash
# Start an MLflow tracking server on a segsde output directory: its sqlite store (OUT/mlflow.db, where
# tune/run_ablation.py and tune/run_sweep.py track by default) and artifact root (OUT/mlartifacts), bound to
# 127.0.0.1 (reach it from elsewhere through SSH port forwarding).
#   mlflow/serve.sh [PORT] [OUT]      defaults: 5000, ./outputs;  then open http://127.0.0.1:PORT
# A server others can reach (a cluster's head: HOST=0.0.0.0, ALLOWED_HOSTS=<names clients use>) runs MLflow's
# basic-auth app, and is refused without it: MLFLOW_AUTH=1 with MLFLOW_AUTH_ADMIN_PASSWORD (and optionally
# MLFLOW_AUTH_ADMIN_USERNAME, default admin) from the environment, never from this repository. The user store is
# OUT/mlflow-auth.db; nobody but that user reads or writes (default permission NO_PERMISSIONS). Clients log in
# with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -euo pipefail
port="${1:-5000}"
out="$(realpath -m "${2:-outputs}")"
host="${HOST:-127.0.0.1}"
artifacts="${ARTIFACTS:-$out/mlartifacts}"   # on a cluster: ARTIFACTS=$SEGSDE_STORAGE/mlflow (the storage root)
if [ -z "${MLFLOW_AUTH:-}" ] && [[ "$host" != 127.* && "$host" != localhost && "$host" != ::1 ]]; then
  echo "serve.sh: error: HOST=$host without MLFLOW_AUTH=1 lets anyone who reaches this machine read and write the studies: set MLFLOW_AUTH=1 and MLFLOW_AUTH_ADMIN_PASSWORD, or bind to 127.0.0.1" >&2
  exit 2
fi
mkdir -p "$out"
[[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
args=(--backend-store-uri "sqlite:///$out/mlflow.db" --artifacts-destination "$artifacts"
      --host "$host" --port "$port" --workers 1)
[ -n "${ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$ALLOWED_HOSTS")
if [ -n "${MLFLOW_AUTH:-}" ]; then
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && [ ! -s "$out/mlflow-auth.db" ]; then
    echo "serve.sh: error: MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD in the environment for its first start (e.g. from ~/.segsde/cluster.env, mode 600)" >&2
    exit 2
  fi
  if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    export MLFLOW_AUTH_CONFIG_PATH="$out/basic_auth.ini"
    (umask 077 && cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$out/mlflow-auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
EOF
    )
  fi
  # the login form's CSRF key: one server, so a fresh one per start does (sessions end with the server)
  export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
  args+=(--app-name basic-auth)
fi
exec mlflow server "${args[@]}"
