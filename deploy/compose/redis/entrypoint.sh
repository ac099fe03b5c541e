#!/bin/sh
# `redis-server ARGS...` as the official image runs it: without a configuration file Redis would only
# answer on the loopback interface (protected mode), which no other container can reach.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  exec redis-server --bind "* -::*" --protected-mode no "$@"
fi
exec "$@"
