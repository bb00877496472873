"""Profiles and sessions in the database: blocking methods, called from worker threads.

A turn is taken in three steps so the slow part (generation) holds no database transaction:
``begin_turn`` leases the session (an atomic UPDATE on its row, so it works across server
processes sharing one PostgreSQL), the caller generates, and ``commit_turn`` appends the two
messages and releases the lease in one transaction, or ``release`` gives the lease back.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from steer.service.npc.db import MessageRow, ProfileRow, SessionRow
from steer.npc import NpcProfile

# A lease older than this belongs to a request whose server died mid-reply; another may take it.
LEASE_TIMEOUT_S = 300.0


class SessionNotFound(LookupError):
    pass


class SessionBusy(RuntimeError):
    """Another request holds the session's lease."""


@dataclass
class SessionInfo:
    id: str
    npc_id: str
    player_name: str | None
    seed: int | None
    turns: int
    created_at: float
    updated_at: float
    busy: bool

    @classmethod
    def from_row(cls, row: SessionRow, now: float | None = None) -> SessionInfo:
        now = time.time() if now is None else now
        busy = row.lock_token is not None and (row.locked_at or 0) > now - LEASE_TIMEOUT_S
        return cls(id=row.id, npc_id=row.npc_id, player_name=row.player_name, seed=row.seed, turns=row.turns,
                   created_at=row.created_at, updated_at=row.updated_at, busy=busy)


@dataclass
class TurnLease:
    session: SessionInfo
    token: str
    history: list[dict[str, Any]]


class NpcStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def _db(self) -> Session:
        return self._sessions()

    # ---------------------------------------------------------- profiles
    def list_profiles(self) -> list[NpcProfile]:
        with self._db() as db:
            rows = db.scalars(sa.select(ProfileRow).order_by(ProfileRow.id)).all()
            return [NpcProfile.model_validate(r.data) for r in rows]

    def get_profile(self, npc_id: str) -> NpcProfile | None:
        with self._db() as db:
            row = db.get(ProfileRow, npc_id)
            return None if row is None else NpcProfile.model_validate(row.data)

    def put_profile(self, profile: NpcProfile, source: str, create_only: bool = False) -> bool:
        """Insert or replace; returns whether it was new. ``create_only``: False if it exists."""
        with self._db() as db, db.begin():
            row = db.get(ProfileRow, profile.id, with_for_update=True)
            if row is not None:
                if create_only:
                    return False
                row.data, row.source, row.updated_at = profile.model_dump(mode="json"), source, time.time()
                return False
            db.add(ProfileRow(id=profile.id, data=profile.model_dump(mode="json"), source=source,
                              updated_at=time.time()))
            return True

    def delete_profile(self, npc_id: str) -> bool:
        """Remove a profile; its sessions stay (readable, exportable) but cannot take new lines."""
        with self._db() as db, db.begin():
            return db.execute(sa.delete(ProfileRow).where(ProfileRow.id == npc_id)).rowcount > 0

    def sync_file_profiles(self, profiles: dict[str, NpcProfile]) -> None:
        """The files win at start-up: each file profile replaces what the database holds under its id."""
        for profile in profiles.values():
            self.put_profile(profile, "file")

    # ---------------------------------------------------------- sessions
    def create_session(self, npc_id: str, player_name: str | None, seed: int | None,
                       messages: list[dict[str, Any]] | None = None) -> SessionInfo:
        now = time.time()
        messages = messages or []
        row = SessionRow(id=uuid.uuid4().hex, npc_id=npc_id, player_name=player_name, seed=seed,
                         turns=sum(1 for m in messages if m["role"] == "assistant"),
                         created_at=now, updated_at=now)
        with self._db() as db, db.begin():
            db.add(row)
            db.flush()
            for i, m in enumerate(messages):
                db.add(MessageRow(session_id=row.id, position=i, role=m["role"], content=m["content"],
                                  meta=m.get("meta"), created_at=m.get("created_at") or now))
        return SessionInfo.from_row(row, now)

    def get_session(self, sid: str) -> SessionInfo:
        with self._db() as db:
            row = db.get(SessionRow, sid)
            if row is None:
                raise SessionNotFound(sid)
            return SessionInfo.from_row(row)

    def messages(self, sid: str) -> list[dict[str, Any]]:
        with self._db() as db:
            if db.get(SessionRow, sid) is None:
                raise SessionNotFound(sid)
            rows = db.scalars(sa.select(MessageRow).where(MessageRow.session_id == sid)
                              .order_by(MessageRow.position)).all()
            return [{"index": r.position, "role": r.role, "content": r.content, "meta": r.meta,
                     "created_at": r.created_at} for r in rows]

    def delete_session(self, sid: str) -> None:
        with self._db() as db, db.begin():
            db.execute(sa.delete(MessageRow).where(MessageRow.session_id == sid))
            if db.execute(sa.delete(SessionRow).where(SessionRow.id == sid)).rowcount == 0:
                raise SessionNotFound(sid)

    # ------------------------------------------------------------- turns
    def begin_turn(self, sid: str) -> TurnLease:
        """Lease the session for one reply; ``SessionBusy`` if another request holds it."""
        token, now = uuid.uuid4().hex, time.time()
        with self._db() as db, db.begin():
            taken = db.execute(
                sa.update(SessionRow)
                .where(SessionRow.id == sid,
                       sa.or_(SessionRow.lock_token.is_(None), SessionRow.locked_at < now - LEASE_TIMEOUT_S))
                .values(lock_token=token, locked_at=now)
            ).rowcount
            if not taken:
                if db.get(SessionRow, sid) is None:
                    raise SessionNotFound(sid)
                raise SessionBusy(sid)
        info = self.get_session(sid)
        return TurnLease(session=info, token=token, history=self.messages(sid))

    def commit_turn(self, lease: TurnLease, player_line: str, reply: str, meta: dict[str, Any]) -> int:
        """Append the exchange and release the lease; returns the reply's message index."""
        now = time.time()
        with self._db() as db, db.begin():
            released = db.execute(
                sa.update(SessionRow)
                .where(SessionRow.id == lease.session.id, SessionRow.lock_token == lease.token)
                .values(lock_token=None, locked_at=None, turns=SessionRow.turns + 1, updated_at=now)
            ).rowcount
            if not released:  # deleted meanwhile, or the lease timed out and someone else took it
                raise SessionBusy(lease.session.id)
            start = len(lease.history)
            db.add(MessageRow(session_id=lease.session.id, position=start, role="user", content=player_line,
                              created_at=now))
            db.add(MessageRow(session_id=lease.session.id, position=start + 1, role="assistant", content=reply,
                              meta=meta, created_at=now))
        return start + 1

    def release(self, lease: TurnLease) -> None:
        with self._db() as db, db.begin():
            db.execute(sa.update(SessionRow)
                       .where(SessionRow.id == lease.session.id, SessionRow.lock_token == lease.token)
                       .values(lock_token=None, locked_at=None))
