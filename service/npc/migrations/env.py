"""Alembic environment: migrations run on the connection ``steer.service.npc.db.upgrade`` passes in."""

from alembic import context

from steer.service.npc.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the NPC session migrations through service.npc.db.upgrade(engine)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
