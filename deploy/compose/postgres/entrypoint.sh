#!/bin/sh
# Runs PostgreSQL as the `postgres` user, creating the cluster in $PGDATA on the first start:
# POSTGRES_USER (default postgres) with POSTGRES_PASSWORD as its password (required: there is no
# default), POSTGRES_DB (default: the user's name). Local connections in the container are trusted
# (for pg_isready); every connection over the network needs the password (scram-sha-256).
set -eu

if [ "${1:-}" != postgres ]; then
  exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
  # A fresh volume may be root's: hand it to postgres, then drop root for good.
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 0700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "error: POSTGRES_PASSWORD is not set: refusing to create a database cluster without a password" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    # Socket only while the database is made: nobody can connect before it is ready.
    pg_ctl --wait --silent -o "-c listen_addresses=''" start
    # From standard input: psql substitutes :"db" (quoted as an identifier) there, not in --command.
    echo 'CREATE DATABASE :"db";' | psql --quiet --no-psqlrc --username="$user" --dbname=postgres \
      --set=ON_ERROR_STOP=1 --set=db="$db" >/dev/null
    pg_ctl --wait --silent --mode=fast stop
  fi
  echo "aeco-postgres: cluster created in $PGDATA (user $user, database $db)"
fi

exec "$@"
