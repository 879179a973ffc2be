#!/bin/sh
# Start the MLflow server with basic auth. The auth app reads its settings from an ini file, which cannot
# take environment variables, so the file is written here from the environment (it holds the database
# password: it lives in the container's private temp dir, readable by this user only).
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?}"
: "${MLFLOW_AUTH_DATABASE_URI:?}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?the admin password must be set (MLflow ships none)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"

umask 077
conf_dir=$(mktemp -d)
cat > "$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"

# Host headers the server answers (DNS-rebinding protection); patterns include the port, e.g.
# "mlflow.example.com:*". Unset: MLflow's default (localhost and private networks).
set -- --app-name basic-auth \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  set -- "$@" --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
fi
exec mlflow server "$@"
