#!/usr/bin/env bash
# featstudy's tracking server preset: PostgreSQL (Debian's package) behind `mlflow server --serve-artifacts`,
# both on 127.0.0.1. Jobs talk HTTP to MLflow (tracking.uri=http://127.0.0.1:$MLFLOW_PORT), never to PostgreSQL.
#
#   scripts/tracking_server.sh start    # installs PostgreSQL where absent, initialises, starts both; idempotent
#   scripts/tracking_server.sh stop
#   scripts/tracking_server.sh status
#
# Settings (environment): FEATSTUDY_TRACKING_DIR (default <repo>/.tracking), PGPORT (55432),
# MLFLOW_PORT (5055), MLFLOW_WORKERS (4). Data, logs and artifacts live under FEATSTUDY_TRACKING_DIR.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${FEATSTUDY_TRACKING_DIR:-$here/.tracking}")
pgport=${PGPORT:-55432}
mlport=${MLFLOW_PORT:-5055}
workers=${MLFLOW_WORKERS:-4}
mlflow_bin=${MLFLOW_BIN:-$here/.venv/bin/mlflow}
py_bin=$(dirname "$mlflow_bin")/python
pgdata=$dir/pgdata
dbname=mlflow
dbuser=featstudy

die() { echo "tracking-server: $*" >&2; exit 2; }

find_pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

ensure_postgres() {
  if ! pgbin=$(find_pg_bin); then
    echo "tracking-server: PostgreSQL not found; installing Debian's postgresql package" >&2
    [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed and this user cannot apt-get install it: run 'sudo apt-get install -y postgresql'"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; } \
      || die "apt-get install postgresql failed"
    pgbin=$(find_pg_bin) || die "postgresql installed but no initdb found under /usr/lib/postgresql/*/bin"
  fi
  if ! "$py_bin" -c "import psycopg" 2>/dev/null; then
    "$py_bin" -m pip install -q "psycopg[binary]>=3.2" || die "pip install psycopg[binary] failed"
  fi
}

# PostgreSQL refuses to run as root: run its tools as the 'postgres' user when we are root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_running() { as_pg "$pgbin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; }
ml_running() { [ -f "$dir/mlflow.pid" ] && kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; }

start() {
  ensure_postgres
  mkdir -p "$dir/artifacts" "$dir/logs"
  if [ ! -s "$pgdata/PG_VERSION" ]; then
    mkdir -p "$pgdata"
    [ "$(id -u)" = 0 ] && chown -R postgres: "$pgdata" "$dir/logs"
    chmod 700 "$pgdata"
    as_pg "$pgbin/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 >"$dir/logs/initdb.log" 2>&1 \
      || die "initdb failed, see $dir/logs/initdb.log"
  fi
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/logs"
  if ! pg_running; then
    as_pg "$pgbin/pg_ctl" -D "$pgdata" -l "$dir/logs/postgres.log" -w -t 60 \
      -o "-h 127.0.0.1 -p $pgport -k $pgdata -c max_connections=200" start >/dev/null \
      || die "PostgreSQL did not start, see $dir/logs/postgres.log"
  fi
  local psql=("$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -tAq)
  if [ -z "$(as_pg "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='$dbuser'")" ]; then
    as_pg "${psql[@]}" -c "CREATE ROLE $dbuser LOGIN"
  fi
  if [ -z "$(as_pg "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$dbname'")" ]; then
    as_pg "${psql[@]}" -c "CREATE DATABASE $dbname OWNER $dbuser"
  fi
  if ! ml_running; then
    # Explicit pool settings: a few server workers share the connections, jobs never connect to PostgreSQL.
    MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=${MLFLOW_SQLALCHEMYSTORE_POOL_SIZE:-10} \
    MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=${MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW:-20} \
    MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE=${MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE:-1800} \
    setsid "$mlflow_bin" server \
      --backend-store-uri "postgresql+psycopg://$dbuser@127.0.0.1:$pgport/$dbname" \
      --serve-artifacts --artifacts-destination "$dir/artifacts" \
      --host 127.0.0.1 --port "$mlport" --workers "$workers" \
      >"$dir/logs/mlflow.log" 2>&1 < /dev/null &
    echo $! >"$dir/mlflow.pid"
  fi
  local i
  for i in $(seq 1 120); do
    if "$py_bin" - "$mlport" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2).read()
PY
    then
      echo "tracking server: http://127.0.0.1:$mlport  (PostgreSQL 127.0.0.1:$pgport/$dbname, artifacts $dir/artifacts)"
      echo "use it: python -m featstudy tracking.uri=http://127.0.0.1:$mlport ..."
      return 0
    fi
    ml_running || die "mlflow server exited, see $dir/logs/mlflow.log"
    sleep 1
  done
  die "mlflow server did not answer on 127.0.0.1:$mlport within 120 s, see $dir/logs/mlflow.log"
}

stop() {
  if ml_running; then
    local pid; pid=$(cat "$dir/mlflow.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$dir/mlflow.pid"
  if pgbin=$(find_pg_bin) && [ -d "$pgdata" ] && pg_running; then
    as_pg "$pgbin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
  fi
  echo "tracking server stopped"
}

status() {
  pgbin=$(find_pg_bin) || { echo "postgresql: not installed"; return 0; }
  if [ -d "$pgdata" ] && pg_running; then echo "postgresql: running on 127.0.0.1:$pgport"; else echo "postgresql: stopped"; fi
  if ml_running; then echo "mlflow: running on http://127.0.0.1:$mlport"; else echo "mlflow: stopped"; fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 {start|stop|status}" ;;
esac
