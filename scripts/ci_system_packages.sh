#!/usr/bin/env bash
# Debian packages the integration tests use besides PostgreSQL (scripts/ci_postgres.sh):
#   prometheus (+ promtool)   the monitoring tests run the dashboard's queries and the alert rules on it
#   chromium                  the web console's browser test (Playwright drives this binary; it never
#                             downloads a browser of its own)
# The tests start their own processes (free ports, temp dirs, stopped by PID); this only installs.
# Usage: scripts/ci_system_packages.sh   (idempotent; needs root or sudo when it has to install)
set -euo pipefail

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ "${#missing[@]}" -eq 0 ]; then
  echo "ci_system_packages: found $(prometheus --version 2>&1 | head -1 | cut -d' ' -f1-3), $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "ci_system_packages: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# Prometheus' service is not started in a container without an init system; the tests do not use it.
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
command -v promtool >/dev/null && command -v chromium >/dev/null || {
  echo "ci_system_packages: install failed (promtool or chromium missing)" >&2
  exit 1
}
