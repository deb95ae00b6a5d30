"""Database connection and migrations.

    engine = connect("sqlite:///feedback.db")       # a file (WAL, busy timeout) or postgresql+psycopg://user@host/db
    upgrade("sqlite:///feedback.db")                # alembic upgrade head, as `flywheel db upgrade` does

A bare path (`feedback.db`) means a SQLite file. SQLite runs in WAL mode with a busy timeout so that the server's
threads and a concurrent `flywheel export` do not fail on a locked database.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from flywheel.errors import UserError

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin and migration-context chatter is not for users
MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str) -> str:
    """A URL, or a file path meaning SQLite. `postgresql://` gets the psycopg 3 driver."""
    if not url:
        raise UserError("no database URL (e.g. sqlite:///feedback.db or postgresql+psycopg://user@host/db)")
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and manifests."""
    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def connect(url: str, *, create_file: bool = True, **kwargs: Any) -> Engine:
    """An engine for `url`. A SQLite file that does not exist is created (with its directory) unless `create_file`
    is false, where that is a one-line error."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"not a database URL: {safe_url(url)}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            if not create_file and not Path(parsed.database).is_file():
                raise UserError(
                    f"no feedback database at {parsed.database}: create one with `flywheel db upgrade --db "
                    f"{parsed.database}` (or `flywheel serve --db`)"
                )
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **kwargs)
    return engine


def require_database(url: str) -> None:
    """A one-line error unless `url` is a feedback database that exists and has its schema: for the commands that
    only read or change one (`flywheel export`, `flywheel db users`), where a mistyped path would otherwise create an
    empty SQLite file."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import DBAPIError

    engine = connect(url, create_file=False)
    try:
        ready = inspect(engine).has_table("users")
    except DBAPIError as err:
        raise UserError(f"cannot open the database {safe_url(url)}: {str(err.orig).strip().splitlines()[0]}") from None
    finally:
        engine.dispose()
    if not ready:
        raise UserError(f"{safe_url(url)} has no feedback tables: run `flywheel db upgrade --db URL` first")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across a killed process, fast commits
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest migration's revision id (what `upgrade(url)` brings a database to)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (creates the tables on a new database)."""
    from alembic import command

    engine = connect(url)
    cfg = alembic_config(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()
    log.info("database %s is at revision %s", safe_url(url), revision)
