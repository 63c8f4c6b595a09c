#!/usr/bin/env bash
# The shared store for many workers: PostgreSQL (Debian's package) and an MLflow tracking server backed by
# it, both on loopback. `make services` (= start), `scripts/services.sh stop|status|env`.
#
#   QSWEEP_SERVICES_DIR  where the database cluster, artifacts, logs and pid files live (default outputs/services)
#   QSWEEP_PG_PORT       PostgreSQL's port (default 5433: clear of a system cluster on 5432)
#   QSWEEP_MLFLOW_PORT   the tracking server's port (default 5000)
#   QSWEEP_HOST          the address both listen on (default 127.0.0.1; see README "Scaling out" before
#                        opening them to other hosts: the database trusts every connection it accepts)
#   PYTHON               the Python with mlflow and psycopg2 (default .venv/bin/python, else python3)
#
# Then: qsweep run -m ... tracking.uri=http://127.0.0.1:5000
#       qsweep search ... search.storage=postgresql://qsweep@127.0.0.1:5433/optuna
# PostgreSQL refuses to run as root: as root, the cluster belongs to, and runs as, the `postgres` user
# that Debian's package creates.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${QSWEEP_SERVICES_DIR:-outputs/services}
PG_PORT=${QSWEEP_PG_PORT:-5433}
MLFLOW_PORT=${QSWEEP_MLFLOW_PORT:-5000}
HOST=${QSWEEP_HOST:-127.0.0.1}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PGDATA=$DIR/pg
PG_USER=qsweep
TRACKING_URI=http://$HOST:$MLFLOW_PORT
BACKEND_URI=postgresql://$PG_USER@$HOST:$PG_PORT/mlflow
OPTUNA_URI=postgresql://$PG_USER@$HOST:$PG_PORT/optuna

die() { echo "services: $*" >&2; exit 1; }

pg_bindir() {
  local found
  if found=$(command -v pg_ctl 2>/dev/null); then dirname "$(readlink -f "$found")"; return; fi
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$found" ]] || die "PostgreSQL is not installed: apt-get install -y postgresql (Debian/Ubuntu)"
  echo "$found"
}
BIN=$(pg_bindir)

# As root, PostgreSQL's commands run as `postgres`; otherwise as the caller.
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user (apt-get install -y postgresql creates it)"
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_running() { as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }
mlflow_pid() { [[ -f "$DIR/mlflow.pid" ]] && kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null && cat "$DIR/mlflow.pid"; }

start_pg() {
  if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
    mkdir -p "$PGDATA"
    if [[ $(id -u) -eq 0 ]]; then
      chown postgres: "$PGDATA"
      runuser -u postgres -- test -x "$PGDATA" || die "user postgres cannot reach $PGDATA: make its parent folders world-searchable (chmod o+x)"
    fi
    # trust: the server listens on $HOST only; every connection it accepts comes from this machine.
    as_pg "$BIN/initdb" -D "$PGDATA" -U "$PG_USER" --auth=trust --encoding=UTF8 --no-instructions >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
  fi
  if pg_running; then
    echo "PostgreSQL already running ($PGDATA)"
  else
    # The socket lives in the data folder: Debian's /var/run/postgresql may not exist or be writable.
    as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=$HOST -k $PGDATA -c max_connections=200" start >/dev/null \
      || { tail -n 20 "$PGDATA/server.log" >&2; die "PostgreSQL did not start (port $PG_PORT in use?)"; }
  fi
  local db
  for db in mlflow optuna; do
    if ! as_pg "$BIN/psql" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
      as_pg "$BIN/createdb" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" "$db"
    fi
  done
  echo "PostgreSQL on $HOST:$PG_PORT (databases mlflow, optuna; data $PGDATA)"
}

start_mlflow() {
  if mlflow_pid >/dev/null; then
    echo "MLflow server already running (pid $(cat "$DIR/mlflow.pid"))"
    return
  fi
  mkdir -p "$DIR/mlartifacts"
  # Its own session, so `stop` ends the server and its workers together. No job runner (GenAI judges,
  # trace roll-ups): a dozen processes polling the store that qsweep's sweeps write to.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PYTHON" -m mlflow server \
    --backend-store-uri "$BACKEND_URI" --artifacts-destination "$DIR/mlartifacts" --serve-artifacts \
    --host "$HOST" --port "$MLFLOW_PORT" --workers "${QSWEEP_MLFLOW_WORKERS:-2}" \
    >"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$DIR/mlflow.pid"
  local waited=0
  until "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "$TRACKING_URI/health" 2>/dev/null; do
    if ! mlflow_pid >/dev/null; then tail -n 30 "$DIR/mlflow.log" >&2; die "the MLflow server exited"; fi
    (( waited++ < 240 )) || { tail -n 30 "$DIR/mlflow.log" >&2; stop_mlflow; die "the MLflow server did not answer in 120 s"; }
    sleep 0.5
  done
  echo "MLflow tracking server on $TRACKING_URI (store $BACKEND_URI, artifacts $DIR/mlartifacts)"
}

stop_mlflow() {
  local pid
  if pid=$(mlflow_pid); then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "MLflow server stopped"
  fi
  rm -f "$DIR/mlflow.pid"
}

stop_pg() {
  if [[ -f "$PGDATA/PG_VERSION" ]] && pg_running; then
    as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    echo "PostgreSQL stopped"
  fi
}

print_env() {
  echo "tracking.uri=$TRACKING_URI search.storage=$OPTUNA_URI"
}

case "${1:-start}" in
  start)
    start_pg
    start_mlflow
    echo "use: qsweep run -m ... tracking.uri=$TRACKING_URI"
    echo "     qsweep search ... tracking.uri=$TRACKING_URI search.storage=$OPTUNA_URI search.n_workers=2"
    ;;
  stop) stop_mlflow; stop_pg ;;
  status)
    if pg_running; then echo "PostgreSQL: running on $HOST:$PG_PORT ($PGDATA)"; else echo "PostgreSQL: stopped"; fi
    if pid=$(mlflow_pid); then echo "MLflow server: running on $TRACKING_URI (pid $pid)"; else echo "MLflow server: stopped"; fi
    ;;
  env) print_env ;;
  *) die "usage: scripts/services.sh start|stop|status|env" ;;
esac
