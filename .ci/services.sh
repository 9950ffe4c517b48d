#!/usr/bin/env bash
# Bring up PostgreSQL and RabbitMQ for the tests: install when absent, start when stopped.
# Writes .ci/test.env with the URLs the tests use.
set -euo pipefail
cd "$(dirname "$0")"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_install() {
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

# -- PostgreSQL ----------------------------------------------------------------
command -v pg_ctlcluster >/dev/null || apt_install postgresql
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    version=$(ls /etc/postgresql | sort -V | tail -1)
    $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
for _ in $(seq 60); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.5; done
pg_dsn="postgresql://postgres@127.0.0.1:5432/postgres"
if ! psql "$pg_dsn" -qtAc 'select 1' >/dev/null 2>&1; then
    # A stock Debian cluster asks for a password over TCP: give the postgres role one.
    $sudo su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'nephos'\"" >/dev/null
    pg_dsn="postgresql://postgres:nephos@127.0.0.1:5432/postgres"
fi
psql "$pg_dsn" -qtAc 'select 1' >/dev/null

# -- RabbitMQ ------------------------------------------------------------------
command -v rabbitmqctl >/dev/null || apt_install rabbitmq-server
if ! $sudo rabbitmqctl -q status >/dev/null 2>&1; then
    $sudo rabbitmq-server -detached
elif ! (echo >/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    # The node runs but its application was stopped (say, an interrupted `make faults`).
    $sudo rabbitmqctl -q start_app >/dev/null || true
fi
$sudo rabbitmqctl -q await_startup --timeout 120 >/dev/null
if ! $sudo rabbitmq-diagnostics -q check_alarms >/dev/null 2>&1; then
    echo "services: RabbitMQ has a resource alarm (publishers are blocked):" >&2
    $sudo rabbitmq-diagnostics -q alarms >&2 || true
fi

echo "NEPHOS_TEST_PG=$pg_dsn" > test.env
echo "NEPHOS_TEST_AMQP=amqp://guest:guest@127.0.0.1:5672/" >> test.env
echo "services: PostgreSQL and RabbitMQ are up"
