#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs pytest.
#   - Debian's PostGIS package for the PostgreSQL server at $PGHOST:$PGPORT (127.0.0.1:5432 by default), and
#     Debian's docker-compose (only to validate docker-compose.yml; no Docker engine is needed), and Debian's chromium
#     (headless, to render the evaluation report);
#   - a virtual environment .venv with the project and its [train,test,gpu-report] extras (gpu-report: the embedded
#     PostgreSQL that the SIGTERM test of bench/gpu_report.py starts).
# Extra arguments go to both pytest runs below (e.g. scripts/test.sh tests/unit -x; -k selects, -m does not).
set -euo pipefail
cd "$(dirname "$0")/.."
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! pg_isready -q -t 5; then
  echo "PostgreSQL is not answering at $PGHOST:$PGPORT; trying to start the local cluster" >&2
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -n | tail -n 1)" main start
  pg_isready -t 30
fi
PG_MAJOR=$(psql -d postgres -Atc "SELECT current_setting('server_version_num')::int / 10000")
need_apt=()
psql -d postgres -Atc "SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'" | grep -q 1 \
  || need_apt+=("postgresql-${PG_MAJOR}-postgis-3")
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v chromium >/dev/null || need_apt+=(chromium)  # headless: tests/integration/test_report.py
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[train,test,gpu-report]'
# Two parts: the tests that measure time (rates, timeouts, windows: marked `timing`) run after the others, which run
# on TEST_WORKERS processes (pytest-xdist, default 2). The timing tests mostly wait (a quarter of 2 cores): they run on
# 2 processes too, the ones that start several harvester processes each (group harvester_processes) one at a time.
# On the 2-core development machine: one process took 939 s for everything; the first part 252-595 s, the timing
# tests 325-341 s alone, 158-211 s on 2 processes.
# Exit status 5 (no test selected) of one part is not a failure: arguments may name tests of one part only.
status=0; .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" -m "not timing" "$@" || status=$?
timing=0; .venv/bin/python -m pytest -q -n 2 --dist loadgroup -m timing "$@" || timing=$?
if [ $status -eq 5 ] && [ $timing -eq 5 ]; then exit 5; fi
for rc in $status $timing; do
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then exit $rc; fi
done
