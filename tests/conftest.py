"""Shared test setup: the repo root on sys.path, throw-away MySQL databases, the store URLs, and what
the protocol reference (docs/protocol.md) leaves out of a STATUS reply.

MySQL: `make test` sets SALDO_TEST_MYSQL_URL to a base URL such as
mysql://root@127.0.0.1:3306/saldo_test_1234. Each test that wants MySQL gets its own database
named <base>_<random>, and every such database is dropped when the session ends. Without the
variable the MySQL tests are skipped, unless SALDO_REQUIRE_MYSQL=1 (CI), where they fail instead:
CI must never pass by silently skipping the MySQL backend.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import urllib.parse
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MYSQL_URL_ENV = "SALDO_TEST_MYSQL_URL"
REQUIRE_MYSQL_ENV = "SALDO_REQUIRE_MYSQL"
_DATABASE_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
# The random suffix: "_" and 8 hex digits.
_SUFFIX_CHARS = 9


def _mysql_connect(parsed: urllib.parse.SplitResult, database: str | None = None):
    import pymysql

    return pymysql.connect(
        host=parsed.hostname or "127.0.0.1",
        port=parsed.port or 3306,
        user=urllib.parse.unquote(parsed.username or "root"),
        password=urllib.parse.unquote(parsed.password or ""),
        database=database,
        connect_timeout=5,
        autocommit=True,
    )


class MySQLDatabases:
    """Hands out fresh database URLs under one base URL, and drops them all at the end."""

    def __init__(self, base_url: str) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        base_name = parsed.path.lstrip("/")
        if parsed.scheme != "mysql" or not _DATABASE_NAME_RE.fullmatch(base_name):
            raise ValueError(f"{MYSQL_URL_ENV} must look like mysql://user@host:port/dbname, got {base_url!r}")
        if len(base_name) + _SUFFIX_CHARS > 64:
            raise ValueError(f"{MYSQL_URL_ENV}: database name {base_name!r} leaves no room for a suffix")
        self.base_url = base_url
        self.base_name = base_name
        self._parsed = parsed

    def new_url(self) -> str:
        name = f"{self.base_name}_{secrets.token_hex(4)}"
        assert _DATABASE_NAME_RE.fullmatch(name), name
        return urllib.parse.urlunsplit(self._parsed._replace(path="/" + name, query="", fragment=""))

    def check_reachable(self) -> None:
        _mysql_connect(self._parsed).close()

    def ours(self, name: str) -> bool:
        # `name.startswith(base)` alone would also match another run's base (saldo_test_12 vs
        # saldo_test_123): only the base itself and <base>_<suffix> belong to this session.
        return name == self.base_name or name.startswith(self.base_name + "_")

    def drop_all(self) -> list[str]:
        connection = _mysql_connect(self._parsed)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW DATABASES")
                names = [row[0] for row in cursor.fetchall() if self.ours(row[0])]
                for name in names:
                    cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
            return names
        finally:
            connection.close()


@pytest.fixture(scope="session")
def mysql_databases():
    base_url = os.environ.get(MYSQL_URL_ENV, "").strip()
    if not base_url:
        if os.environ.get(REQUIRE_MYSQL_ENV) == "1":
            pytest.fail(f"{REQUIRE_MYSQL_ENV}=1 but {MYSQL_URL_ENV} is not set: the MySQL tests cannot run", pytrace=False)
        pytest.skip(f"MySQL backend not tested: set {MYSQL_URL_ENV} (for example run `make test`)")
    databases = MySQLDatabases(base_url)
    try:
        databases.check_reachable()
    except Exception as error:  # A URL was given: an unreachable server is a failure, not a skip.
        pytest.fail(f"{MYSQL_URL_ENV}={base_url!r} does not answer: {error!r}", pytrace=False)
    yield databases
    databases.drop_all()


@pytest.fixture
def mysql_url_factory(mysql_databases):
    """A function returning a new, empty database URL at each call (dropped at session end)."""
    return mysql_databases.new_url


@pytest.fixture
def mysql_url(mysql_url_factory) -> str:
    return mysql_url_factory()


def sqlite_url(path: Path) -> str:
    """sqlite:////abs/path.db (three slashes of the scheme, then the absolute path's own)."""
    path = path.resolve()
    assert path.is_absolute()
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "mysql"])
def store_url(request, tmp_path) -> str:
    """One fresh store per test, on each backend."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "store.db")
    return request.getfixturevalue("mysql_url")


@pytest.fixture
def open_store(store_url):
    """open_store() opens (another) Store on this test's database; all are closed at teardown."""
    from common.storage.store import open_store as _open

    opened = []

    def opener(url: str | None = None):
        store = _open(url or store_url)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def undocumented_status_fields():
    """A function: the fields of a STATUS reply (with those of its per-replica and per-counter
    objects, and its ROLE and MODE) that docs/protocol.md, the client writer's reference, does not
    name as `FIELD`."""
    reference = (REPO_ROOT / "docs" / "protocol.md").read_text()

    def undocumented(status: dict) -> set[str]:
        names = set(status) | {str(status.get("ROLE")), str(status.get("MODE", status.get("ROLE")))}
        for value in status.values():
            if isinstance(value, dict):
                inner = list(value.values())
                per_member = bool(inner) and isinstance(inner[0], dict)  # REPLICAS, BACKUPS, UNREACHABLE
                names |= {key for item in inner for key in item} if per_member else set(value)
        return {name for name in names if f"`{name}`" not in reference}

    return undocumented
