#!/usr/bin/env bash
# Set up a fresh Debian machine for the test suite and run it:
#   apt: dcmtk (real DIMSE peers), orthanc (the PACS), postgresql (the scale-out database),
#        libgdcm-tools and odil (more independent peers), dicom3tools (dciodvfy checks the SR/KOS),
#        chromium (the status page in a real browser)
#   pip: the CPU build of torch on disk, then the package with its test extras (editable)
#   a throwaway PostgreSQL cluster on a free loopback port, stopped again on exit
# Arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/bin/storescp ] || need_apt+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
[ -x /usr/bin/dciodvfy ] || need_apt+=(dicom3tools)
command -v gdcmscu >/dev/null 2>&1 || need_apt+=(libgdcm-tools)
command -v odil >/dev/null 2>&1 || need_apt+=(odil)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[test]'

# A private PostgreSQL cluster for the tests (postgres refuses to run as root: run it as 'postgres').
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
pg_dir=$(mktemp -d /tmp/dicomnode-pg.XXXXXX)
chown postgres "$pg_dir"
pg_port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
stop_pg() { su postgres -s /bin/sh -c "$pg_bin/pg_ctl -D $pg_dir/data -m immediate stop" >/dev/null 2>&1 || true; rm -rf "$pg_dir"; }
trap stop_pg EXIT
su postgres -s /bin/sh -c "$pg_bin/initdb -D $pg_dir/data -U postgres --auth=trust -E UTF8" >/dev/null
su postgres -s /bin/sh -c "$pg_bin/pg_ctl -D $pg_dir/data -w -l $pg_dir/log -o \"-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off\" start" >/dev/null
export DICOMNODE_TEST_POSTGRES_URL="postgresql+psycopg2://postgres@127.0.0.1:$pg_port/postgres"

$PY -m pytest "$@"
