#!/usr/bin/env bash
# Make sure Prometheus and promtool are installed for the monitoring tests (Debian's package). The tests
# start their own Prometheus (free port, temp data dir, stopped by PID); this only installs, it starts nothing.
# Usage: scripts/ci_prometheus.sh   (idempotent; needs root or sudo when it has to install)
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  echo "ci_prometheus: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "ci_prometheus: installing Prometheus with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# The package's service is not started in a container without an init system; the tests do not use it.
$SUDO apt-get install -y -q --no-install-recommends prometheus
command -v promtool >/dev/null || { echo "ci_prometheus: install failed (no promtool)" >&2; exit 1; }
