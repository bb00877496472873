"""The session database: SQLAlchemy tables, engine creation and Alembic migrations.

One schema for SQLite and PostgreSQL; the schema is versioned by the Alembic scripts in
``service/npc/migrations`` and brought up to date when the server starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_DATABASE_URL = "sqlite:///steer-sessions.db"
# Any fixed number: serialises schema migrations of servers that start together on one PostgreSQL.
_MIGRATION_LOCK_KEY = 0x5733_4E50


class DatabaseError(SteerError, ValueError):
    """A database URL that cannot be used."""


class Base(DeclarativeBase):
    pass


class ProfileRow(Base):
    __tablename__ = "npc_profiles"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    data: Mapped[dict] = mapped_column(sa.JSON, nullable=False)
    source: Mapped[str] = mapped_column(sa.String(16), nullable=False)  # "file" or "api"
    updated_at: Mapped[float] = mapped_column(sa.Float, nullable=False)


class SessionRow(Base):
    __tablename__ = "npc_sessions"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    npc_id: Mapped[str] = mapped_column(sa.String(64), nullable=False, index=True)
    player_name: Mapped[str | None] = mapped_column(sa.String(100))
    seed: Mapped[int | None] = mapped_column(sa.BigInteger)
    # Completed player/NPC exchanges; also the version a turn is committed against.
    turns: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    # A lease held while one request generates a reply, so no other request (in any server
    # process sharing the database) interleaves a turn.
    lock_token: Mapped[str | None] = mapped_column(sa.String(64))
    locked_at: Mapped[float | None] = mapped_column(sa.Float)
    created_at: Mapped[float] = mapped_column(sa.Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(sa.Float, nullable=False)


class MessageRow(Base):
    __tablename__ = "npc_messages"
    __table_args__ = (sa.UniqueConstraint("session_id", "position", name="uq_npc_messages_session_position"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("npc_sessions.id", ondelete="CASCADE"),
                                            nullable=False, index=True)
    position: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    role: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    content: Mapped[str] = mapped_column(sa.Text, nullable=False)
    # NPC replies: applied attributes, seed, clamps, safety outcome, scores.
    meta: Mapped[dict | None] = mapped_column(sa.JSON)
    created_at: Mapped[float] = mapped_column(sa.Float, nullable=False)


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy's own default is psycopg2)."""
    try:
        parsed = make_url(url)
    except Exception:
        raise DatabaseError(f"database URL {url!r} is not a URL such as sqlite:///sessions.db or "
                            "postgresql://user:password@host/dbname", "database_url") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseError(f"database URL {url!r}: only sqlite:/// and postgresql:// are supported", "database_url")
    return parsed.render_as_string(hide_password=False)


def create_db_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        # Requests run in worker threads; SQLite waits up to 30 s for another writer.
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            if ":memory:" not in url:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def open_database(url: str) -> Engine:
    """An engine on ``url`` with the schema migrated to the latest version (blocking).
    ``DatabaseError`` names the database (without its password) when it cannot be reached."""
    engine = create_db_engine(url)
    try:
        upgrade(engine)
    except sa.exc.SQLAlchemyError as e:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise DatabaseError(f"cannot open the session database {where}: {reason}", "database_url") from None
    return engine


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` (blocking; call it from a thread)."""
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at INFO
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Transaction-scoped: released when this migration's transaction ends.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
