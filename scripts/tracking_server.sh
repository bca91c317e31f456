#!/usr/bin/env bash
# featstudy's tracking server preset: PostgreSQL (Debian's package) behind `mlflow server --serve-artifacts`,
# both on 127.0.0.1. Jobs talk HTTP to MLflow (tracking.uri=http://127.0.0.1:$MLFLOW_PORT), never to PostgreSQL.
#
#   scripts/tracking_server.sh start    # installs PostgreSQL where absent, initialises, starts both; idempotent
#   scripts/tracking_server.sh stop
#   scripts/tracking_server.sh status
#   scripts/tracking_server.sh env      # export lines for a client: eval "$(scripts/tracking_server.sh env)"
#
# Locked down, because every local user can reach 127.0.0.1:
# * PostgreSQL: scram-sha-256 password authentication on every pg_hba.conf line (local socket and TCP; no trust,
#   no peer, no replication lines). The superuser 'postgres' and the role 'featstudy' (NOSUPERUSER NOCREATEDB
#   NOCREATEROLE NOREPLICATION, owner of the 'mlflow' database; mlflow server connects as it) get generated
#   passwords, stored 0600 under $FEATSTUDY_TRACKING_DIR/secrets/ (0700) as pgpass files. No secret is ever
#   on a command line (ps shows command lines to every user): psql reads SQL on stdin, libpq reads PGPASSFILE.
# * MLflow: `mlflow server --app-name basic-auth` (MLflow's own authentication) with a generated admin password
#   in secrets/mlflow-admin.env (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD lines, 0600); its user
#   store is secrets/mlflow-auth.db (SQLite, configured in secrets/mlflow-auth.ini). Clients pass the
#   credentials in those two environment variables (never inside tracking.uri). FEATSTUDY_TRACKING_AUTH=0 starts
#   MLflow without authentication (its REST API is then open to every local user; PostgreSQL stays locked).
# A cluster made by an older version of this script (trust) is converted on the next start.
#
# Settings (environment): FEATSTUDY_TRACKING_DIR (default <repo>/.tracking), PGPORT (55432),
# MLFLOW_PORT (5055), MLFLOW_WORKERS (4), FEATSTUDY_TRACKING_AUTH (1). Data, logs, artifacts and secrets live
# under FEATSTUDY_TRACKING_DIR.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${FEATSTUDY_TRACKING_DIR:-$here/.tracking}")
pgport=${PGPORT:-55432}
mlport=${MLFLOW_PORT:-5055}
workers=${MLFLOW_WORKERS:-4}
auth=${FEATSTUDY_TRACKING_AUTH:-1}
mlflow_bin=${MLFLOW_BIN:-$here/.venv/bin/mlflow}
py_bin=$(dirname "$mlflow_bin")/python
pgdata=$dir/pgdata
secrets=$dir/secrets
dbname=mlflow
dbuser=featstudy
mluser=admin

die() { echo "tracking-server: $*" >&2; exit 2; }

case "$auth" in 1|0) ;; *) die "FEATSTUDY_TRACKING_AUTH=$auth: use 1 (MLflow login required, the default) or 0 (none)" ;; esac

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
  # MLflow's basic-auth app needs Flask-WTF (mlflow's 'auth' extra)
  if [ "$auth" = 1 ] && ! "$py_bin" -c "import flask_wtf" 2>/dev/null; then
    "$py_bin" -m pip install -q "Flask-WTF<2" || die "pip install Flask-WTF (needed by mlflow server --app-name basic-auth) failed"
  fi
}

# PostgreSQL refuses to run as root: run its server tools as the 'postgres' user when we are root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_running() { as_pg "$pgbin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; }
ml_running() { [ -f "$dir/mlflow.pid" ] && kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; }

# ---- secrets: generated once, 0600 files in a 0700 folder owned by the user running this script ----
write_private() {  # FILE TEXT: written atomically with mode 0600 (printf is a builtin: the text is on no command line)
  (umask 077; printf '%s\n' "$2" >"$1.tmp" && mv -f "$1.tmp" "$1")
}
new_secret() { "$py_bin" -c 'import secrets; print(secrets.token_urlsafe(32))'; }
stored_secret() {  # NAME: the secret in secrets/NAME, generated on first use
  local f=$secrets/$1
  [ -s "$f" ] || write_private "$f" "$(new_secret)"
  chmod 600 "$f"
  tr -d '\n' <"$f"
}
admin_password() { sed -n 's/^MLFLOW_TRACKING_PASSWORD=//p' "$secrets/mlflow-admin.env" 2>/dev/null; }

ensure_secrets() {
  (umask 077; mkdir -p "$secrets")
  chmod 700 "$secrets"
  pg_super_pw=$(stored_secret pg-superuser.password)
  pg_role_pw=$(stored_secret pg-$dbuser.password)
  # pgpass files, for libpq (psql here, psycopg inside mlflow server): host:port:database:user:password
  write_private "$secrets/pg-superuser.pgpass" "*:*:*:postgres:$pg_super_pw"
  write_private "$secrets/pg-$dbuser.pgpass" "*:*:*:$dbuser:$pg_role_pw"
  [ "$auth" = 1 ] || return 0
  if [ ! -s "$secrets/mlflow-admin.env" ]; then
    # the password only seeds the user store when it is created: a new one for an existing store would not work
    [ -e "$secrets/mlflow-auth.db" ] && die "$secrets/mlflow-admin.env is missing but MLflow's user store \
$secrets/mlflow-auth.db exists; restore the file, or delete the store (its users go) and start again"
    write_private "$secrets/mlflow-admin.env" "MLFLOW_TRACKING_USERNAME=$mluser
MLFLOW_TRACKING_PASSWORD=$(new_secret)"
  fi
  chmod 600 "$secrets/mlflow-admin.env"
  flask_key=$(stored_secret mlflow-flask-secret-key)
  write_private "$secrets/mlflow-auth.ini" "[mlflow]
# MLflow's basic-auth app (mlflow server --app-name basic-auth), written by scripts/tracking_server.sh.
# Users other than the admin see nothing unless granted (MLflow's permission REST API).
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$secrets/mlflow-auth.db
admin_username = $mluser
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Each check of a password costs a scrypt hash (~0.1-0.3 s of CPU): a worker remembers a good login for 60 s,
# so a password change reaches the other workers within 60 s.
auth_cache_ttl_seconds = 60"
}

write_hba() {
  # Every connection needs a password; nothing else matches (replication included: no line, refused).
  (umask 077; cat >"$pgdata/pg_hba.conf.tmp" <<'HBA'
# Written by featstudy's scripts/tracking_server.sh: every connection needs a password (scram-sha-256).
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
HBA
  )
  [ "$(id -u)" = 0 ] && chown postgres: "$pgdata/pg_hba.conf.tmp"
  mv -f "$pgdata/pg_hba.conf.tmp" "$pgdata/pg_hba.conf"
}

pg_super() {  # psql as the superuser over TCP, password from the pgpass file; SQL on stdin
  PGPASSFILE="$secrets/pg-superuser.pgpass" "$pgbin/psql" -X -w -h 127.0.0.1 -p "$pgport" -U postgres \
    -d postgres -v ON_ERROR_STOP=1 -tAq "$@"
}

init_cluster() {
  mkdir -p "$pgdata"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$pgdata" "$dir/logs"
  chmod 700 "$pgdata"
  local pwfile; pwfile=$(mktemp "$dir/.initdb-pw.XXXXXX")  # 0600; readable by initdb, removed right after
  printf '%s\n' "$pg_super_pw" >"$pwfile"
  [ "$(id -u)" = 0 ] && chown postgres: "$pwfile"
  if ! as_pg "$pgbin/initdb" -D "$pgdata" -U postgres --auth=scram-sha-256 --pwfile="$pwfile" -E UTF8 \
      >"$dir/logs/initdb.log" 2>&1; then
    rm -f "$pwfile"; die "initdb failed, see $dir/logs/initdb.log"
  fi
  rm -f "$pwfile"
}

start() {
  ensure_postgres
  mkdir -p "$dir/artifacts" "$dir/logs"
  ensure_secrets
  [ -s "$pgdata/PG_VERSION" ] || init_cluster
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/logs"
  if ! pg_running; then
    as_pg "$pgbin/pg_ctl" -D "$pgdata" -l "$dir/logs/postgres.log" -w -t 60 \
      -o "-h 127.0.0.1 -p $pgport -k $pgdata -c max_connections=200 -c password_encryption=scram-sha-256" start >/dev/null \
      || die "PostgreSQL did not start, see $dir/logs/postgres.log"
  fi
  # The superuser's password first (a cluster from an older version of this script still trusts everyone:
  # this sets it), then pg_hba.conf, reloaded: from here on every connection needs a password.
  pg_super <<SQL >/dev/null || die "cannot connect to PostgreSQL on 127.0.0.1:$pgport as postgres with the password in $secrets/pg-superuser.pgpass; restore that file (or use a new FEATSTUDY_TRACKING_DIR)"
ALTER ROLE postgres PASSWORD '$pg_super_pw';
SQL
  write_hba
  as_pg "$pgbin/pg_ctl" -D "$pgdata" reload >/dev/null
  pg_super <<SQL >/dev/null || die "setting up the role $dbuser failed, see $dir/logs/postgres.log"
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$dbuser') THEN CREATE ROLE $dbuser LOGIN; END IF;
END \$\$;
ALTER ROLE $dbuser LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD '$pg_role_pw';
SQL
  if [ -z "$(pg_super -c "SELECT 1 FROM pg_database WHERE datname='$dbname'" </dev/null)" ]; then
    pg_super -c "CREATE DATABASE $dbname OWNER $dbuser" </dev/null >/dev/null
  fi
  pg_super -c "ALTER DATABASE $dbname OWNER TO $dbuser" -c "REVOKE ALL ON DATABASE $dbname FROM PUBLIC" </dev/null >/dev/null
  local mode=none; [ "$auth" = 1 ] && mode=basic-auth
  if ml_running; then
    [ "$(cat "$dir/mlflow.auth" 2>/dev/null)" = "$mode" ] \
      || die "mlflow server is running with another authentication setting than FEATSTUDY_TRACKING_AUTH=$auth; run '$0 stop' first"
  else
    local app=() admin_pw=
    if [ "$auth" = 1 ]; then app=(--app-name basic-auth); admin_pw=$(admin_password); fi
    # Explicit pool settings: a few server workers share the connections, jobs never connect to PostgreSQL.
    # The database password comes from PGPASSFILE (libpq), the admin's from the environment: neither is on the
    # command line. umask 077: the user store and the artifacts are the server's user's alone.
    ( umask 077
      export PGPASSFILE="$secrets/pg-$dbuser.pgpass"
      if [ "$auth" = 1 ]; then
        export MLFLOW_AUTH_CONFIG_PATH="$secrets/mlflow-auth.ini" MLFLOW_FLASK_SERVER_SECRET_KEY="$flask_key" \
          MLFLOW_AUTH_ADMIN_USERNAME="$mluser" MLFLOW_AUTH_ADMIN_PASSWORD="$admin_pw"
      fi
      MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=${MLFLOW_SQLALCHEMYSTORE_POOL_SIZE:-10} \
      MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=${MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW:-20} \
      MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE=${MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE:-1800} \
      exec setsid "$mlflow_bin" server "${app[@]}" \
        --backend-store-uri "postgresql+psycopg://$dbuser@127.0.0.1:$pgport/$dbname" \
        --serve-artifacts --artifacts-destination "$dir/artifacts" \
        --host 127.0.0.1 --port "$mlport" --workers "$workers" \
        >"$dir/logs/mlflow.log" 2>&1 < /dev/null ) &
    echo $! >"$dir/mlflow.pid"
    echo "$mode" >"$dir/mlflow.auth"
  fi
  local i
  for i in $(seq 1 120); do
    # /health needs no login; then one API call with the stored credentials (401 here: a stale user store)
    if code=$(MLFLOW_TRACKING_PASSWORD="$(admin_password)" "$py_bin" - "$mlport" "$mode" "$mluser" <<'PY' 2>/dev/null
import base64, os, sys, urllib.error, urllib.request
port, mode, user = sys.argv[1:4]
urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1")
if mode == "basic-auth":
    token = base64.b64encode(f"{user}:{os.environ['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
try:
    urllib.request.urlopen(req, timeout=10).read()
    print(200)
except urllib.error.HTTPError as exc:
    print(exc.code)
PY
    )
    then
      [ "$code" = 200 ] || die "mlflow server answers $code to the stored credentials in $secrets/mlflow-admin.env; see $dir/logs/mlflow.log"
      echo "tracking server: http://127.0.0.1:$mlport  (PostgreSQL 127.0.0.1:$pgport/$dbname, artifacts $dir/artifacts)"
      if [ "$auth" = 1 ]; then
        echo "MLflow login required: user '$mluser', password in $secrets/mlflow-admin.env"
        echo "use it: eval \"\$($0 env)\"; python -m featstudy tracking.uri=http://127.0.0.1:$mlport ..."
      else
        echo "WARNING: FEATSTUDY_TRACKING_AUTH=0: the MLflow REST API on 127.0.0.1:$mlport is open to every local user" >&2
        echo "use it: python -m featstudy tracking.uri=http://127.0.0.1:$mlport ..."
      fi
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
  rm -f "$dir/mlflow.pid" "$dir/mlflow.auth"
  if pgbin=$(find_pg_bin) && [ -d "$pgdata" ] && pg_running; then
    as_pg "$pgbin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
  fi
  echo "tracking server stopped"
}

status() {
  pgbin=$(find_pg_bin) || { echo "postgresql: not installed"; return 0; }
  if [ -d "$pgdata" ] && pg_running; then echo "postgresql: running on 127.0.0.1:$pgport"; else echo "postgresql: stopped"; fi
  if ml_running; then
    echo "mlflow: running on http://127.0.0.1:$mlport (authentication: $(cat "$dir/mlflow.auth" 2>/dev/null || echo unknown))"
  else
    echo "mlflow: stopped"
  fi
}

env_lines() {
  # For a shell: eval "$(scripts/tracking_server.sh env)". Prints the secret: only for the user who owns it.
  if [ -r "$secrets/mlflow-admin.env" ]; then
    echo "# featstudy tracking server http://127.0.0.1:$mlport (MLflow login)"
    sed -n 's/^\(MLFLOW_TRACKING_[A-Z]*\)=\(.*\)$/export \1='"'"'\2'"'"'/p' "$secrets/mlflow-admin.env"
  else
    echo "# featstudy tracking server: no MLflow credentials in $secrets (not started yet, or FEATSTUDY_TRACKING_AUTH=0)"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) die "usage: $0 {start|stop|status|env}" ;;
esac
