#!/usr/bin/env bash
# Make sure a MariaDB server answers on 127.0.0.1:3306 for the test suite.
#   answers already         -> nothing to do
#   installed but stopped   -> start it
#   not installed           -> apt-get install mariadb-server, then start it
# Then make sure the test account (root with an empty password over TCP, or a dedicated
# saldo_test user when root only logs in through the local socket) can create databases.
# Prints the base URL tests should use, e.g. mysql://root@127.0.0.1:3306
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
HOST=127.0.0.1
PORT=3306

can_connect() {  # $1 user, $2 password
  "$PYTHON" - "$1" "$2" <<'PY' >/dev/null 2>&1
import sys, pymysql
pymysql.connect(host="127.0.0.1", port=3306, user=sys.argv[1], password=sys.argv[2], connect_timeout=2).close()
PY
}

answers() { can_connect root "" || can_connect saldo_test saldo_test; }

start_server() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  echo "ensure-mariadb: starting mariadbd" >&2
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql >&2 \
    || (/usr/sbin/mariadbd --user=mysql >/dev/null 2>&1 &)
  for _ in $(seq 1 60); do
    if "$PYTHON" -c "import socket; socket.create_connection(('$HOST', $PORT), 1).close()" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "ensure-mariadb: mariadbd did not start listening on $HOST:$PORT within 30 s" >&2
  return 1
}

if ! answers; then
  if ! "$PYTHON" -c "import socket; socket.create_connection(('$HOST', $PORT), 1).close()" 2>/dev/null; then
    if [ ! -x /usr/sbin/mariadbd ]; then
      echo "ensure-mariadb: installing mariadb-server with apt" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      apt-get install -y -qq mariadb-server >&2
    fi
    start_server
  fi
fi

if can_connect root ""; then
  echo "mysql://root@$HOST:$PORT"
  exit 0
fi
if ! can_connect saldo_test saldo_test; then
  # A fresh Debian install lets root in only through the socket: create a TCP test account.
  echo "ensure-mariadb: creating the saldo_test account" >&2
  mariadb -uroot <<'SQL' >&2
CREATE USER IF NOT EXISTS 'saldo_test'@'127.0.0.1' IDENTIFIED BY 'saldo_test';
CREATE USER IF NOT EXISTS 'saldo_test'@'localhost' IDENTIFIED BY 'saldo_test';
GRANT ALL PRIVILEGES ON *.* TO 'saldo_test'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'saldo_test'@'localhost';
FLUSH PRIVILEGES;
SQL
fi
can_connect saldo_test saldo_test || { echo "ensure-mariadb: no usable account on $HOST:$PORT" >&2; exit 1; }
echo "mysql://saldo_test:saldo_test@$HOST:$PORT"
