#!/usr/bin/env bash
# Make sure a PostgreSQL server binary is installed for the registry's integration tests.
# The tests start their own throwaway server (initdb into a temp dir, free port,
# stopped by PID), so this only installs packages; it starts nothing.
# Usage: scripts/ci_postgres.sh   (idempotent; needs root or sudo when it has to install)
set -euo pipefail

have_postgres() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null
}

if have_postgres; then
  echo "ci_postgres: PostgreSQL found: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1 || command -v initdb)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "ci_postgres: installing PostgreSQL with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends postgresql
# The distribution package may start a cluster service; the tests do not use it.
if have_postgres; then
  echo "ci_postgres: installed"
else
  echo "ci_postgres: PostgreSQL install failed (no initdb)" >&2
  exit 1
fi
