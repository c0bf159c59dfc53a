#!/usr/bin/env bash
# The whole test suite, set-up included, on a fresh Debian machine (run as root or with sudo):
# Debian tools the integration tests start, a venv with backupmx and its test extras,
# PostgreSQL at 127.0.0.1:5432, then ruff, mypy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- Debian packages -------------------------------------------------------------
# Postfix is installed for its smtp-source and smtp-sink tools only: policy-rc.d
# keeps its daemon from starting, and debconf from configuring mail delivery.
export DEBIAN_FRONTEND=noninteractive
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
  as_root chmod 755 /usr/sbin/policy-rc.d
fi
echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
as_root apt-get update -q
# SpamAssassin's spamd/spamc and rspamd are the real spam filters of the spam-hook tests
# (tests/support/spam_filters.py starts them on loopback; policy-rc.d keeps their daemons off).
# git lists the tracked files the README quick-start test installs from.
as_root apt-get install -y -q --no-install-recommends \
  postfix swaks dnsmasq-base python3-venv git postgresql postgresql-client \
  spamd spamc spamassassin rspamd systemd prometheus >/dev/null

# --- PostgreSQL --------------------------------------------------------------------
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  # No trust authentication on TCP here: give the postgres role a password for the tests.
  as_root runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'postgres'"
  export BACKUPMX_TEST_POSTGRES="postgresql://postgres:postgres@127.0.0.1:5432/postgres"
fi

# --- Python --------------------------------------------------------------------------
venv=${BACKUPMX_VENV:-$root/.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[dev,postgres]"

# --- Checks ----------------------------------------------------------------------------
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
