#!/usr/bin/env bash
# What the tests need outside Python: promtool (Prometheus's linter for metrics and alert rules, from Debian's
# prometheus package), Chromium (the session page is tested in a real headless browser, from Debian's chromium
# package) and the local RabbitMQ on 127.0.0.1:5672, started when it is not running.
set -euo pipefail
apt_install() {
  local packages=("$@")
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null; }
}
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)"
  apt_install prometheus
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Chromium (Debian package chromium)"
  apt_install chromium
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "installing RabbitMQ (Debian package rabbitmq-server)"
  apt_install rabbitmq-server
fi
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 120); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
  rabbitmq-diagnostics -q ping >/dev/null 2>&1 || { echo "RabbitMQ did not start on 127.0.0.1:5672" >&2; exit 1; }
fi
