#!/usr/bin/env bash
# A throwaway PostgreSQL on 127.0.0.1 for the feedback-store tests.
#
#   export POSTTRAIN_TEST_PG_URL=$(.ci/postgres.sh start)   # prints the URL; everything else goes to stderr
#   make test
#   .ci/postgres.sh stop        # `status` exits 0 when the server is running
#
# `start` installs Debian's `postgresql` package when no server binaries are found (as root, through apt-get),
# creates a cluster in $PG_TEST_DIR (trust auth, listening on 127.0.0.1:$PG_TEST_PORT and a socket in that folder
# only), starts it, and creates the database `posttrain_test`. It reuses a cluster that is already there or running.
# As root the server runs as the `postgres` user (initdb refuses root). Exits non-zero, with the reason, on failure.
set -euo pipefail

DIR=${PG_TEST_DIR:-/tmp/posttrain-pg}
PORT=${PG_TEST_PORT:-54329}
DB=posttrain_test

log() { echo "postgres.sh: $*" >&2; }

find_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ] && command -v pg_ctl >/dev/null; then bin=$(dirname "$(command -v pg_ctl)"); fi
    echo "$bin"
}

install_postgres() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "no PostgreSQL found and cannot install it (needs root and apt-get); install the 'postgresql' package"
        return 1
    fi
    log "installing PostgreSQL from Debian's packages..."
    local start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$DIR"
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } >"$DIR/install.log" 2>&1; then
        tail -n 20 "$DIR/install.log" >&2
        log "apt-get install postgresql failed (log: $DIR/install.log)"
        return 1
    fi
    log "installed in $((SECONDS - start)) s"
}

as_owner() {  # run a server command as the cluster's owner
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
    local bin
    bin=$(find_bin)
    if [ -z "$bin" ]; then
        install_postgres
        bin=$(find_bin)
    fi
    [ -x "$bin/pg_ctl" ] || { log "pg_ctl not found after install"; return 1; }
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
    if [ ! -f "$DIR/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$DIR/data" -U postgres -A trust --no-sync -E UTF8 >"$DIR/initdb.log" 2>&1 \
            || { cat "$DIR/initdb.log" >&2; return 1; }
    fi
    if ! as_owner "$bin/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
            -o "-h 127.0.0.1 -p $PORT -k $DIR" start >&2 || { tail -n 20 "$DIR/server.log" >&2; return 1; }
    fi
    if [ -z "$("$bin/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
        "$bin/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
    fi
    log "$("$bin/postgres" --version) on 127.0.0.1:$PORT, data in $DIR/data"
    echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB"
}

status() {
    local bin
    bin=$(find_bin)
    [ -n "$bin" ] && [ -f "$DIR/data/PG_VERSION" ] && as_owner "$bin/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1
}

stop() {
    local bin
    bin=$(find_bin)
    if [ -n "$bin" ] && [ -f "$DIR/data/PG_VERSION" ]; then
        as_owner "$bin/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
