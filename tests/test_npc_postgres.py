"""NPC sessions on PostgreSQL: migrations, leases across connections, and two `steer serve`
processes sharing one database while a conversation alternates between them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def test_migrations_run_once_when_servers_start_together_and_leases_hold_across_connections(postgres_url):
    from steer.service.npc.db import create_db_engine, upgrade
    from steer.service.npc.store import NpcStore, SessionBusy

    engines = [create_db_engine(postgres_url) for _ in range(3)]
    errors = []

    def migrate(engine):
        try:
            upgrade(engine)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=migrate, args=(e,)) for e in engines]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    a, b = NpcStore(engines[0]), NpcStore(engines[1])
    info = a.create_session("brom", "Ana", 3)
    lease = a.begin_turn(info.id)
    with pytest.raises(SessionBusy):
        b.begin_turn(info.id)
    a.commit_turn(lease, "hi", "hmph", {"seed": 1})
    lease = b.begin_turn(info.id)
    assert lease.session.turns == 1 and [m["content"] for m in lease.history] == ["hi", "hmph"]
    b.release(lease)
    for e in engines:
        e.dispose()


def test_a_conversation_survives_a_restart_on_postgres(make_npc_client, say, wait_ready, tiny_policy, postgres_url):
    with make_npc_client(tiny_policy, postgres_url) as c:
        wait_ready(c)
        sid = c.post("/v1/npcs/lysa/sessions", json={"seed": 4}).json()["id"]
        first = say(c, sid, "Evening!", attributes={"humor": 4})
        assert first["attributes"]["humor"] == 4 and first["clamped"] is None
    with make_npc_client(tiny_policy, postgres_url) as c:
        wait_ready(c)
        assert [m["content"] for m in c.get(f"/v1/sessions/{sid}/messages").json()["data"]] == \
            ["Evening!", first["content"]]
        assert say(c, sid, "Any news?")["index"] == 3


def _serve(policy: Path, npcs: Path, db_url: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "steer.cli.main", "serve", "--policy", str(policy), "--npcs", str(npcs),
           "--database-url", db_url, "--port", str(port), "--engine-in-process", "--threads", "1", "--no-ui",
           "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"steer serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become healthy:\n{log.read_text()}")


def test_two_servers_sharing_postgres_serve_one_conversation(npc_examples, free_port, tiny_policy, postgres_url, tmp_path):
    import httpx


    ports = [free_port(), free_port()]
    logs = [tmp_path / f"serve-{p}.log" for p in ports]
    procs = [_serve(tiny_policy, npc_examples, postgres_url, p, log) for p, log in zip(ports, logs)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url, proc, log in zip(urls, procs, logs):
            _wait_healthy(url, proc, log)
        lines = ["Hello, captain.", "Any work?", "Wolves, you say?", "I'll do it."]

        def conversation(pick) -> tuple[str, list[str]]:
            sid = httpx.post(f"{urls[0]}/v1/npcs/captain-ardent/sessions", json={"seed": 21}).json()["id"]
            out = []
            for i, line in enumerate(lines):
                r = httpx.post(f"{pick(i)}/v1/sessions/{sid}/messages", json={"content": line}, timeout=60)
                assert r.status_code == 200, r.text
                out.append(r.json()["content"])
            return sid, out

        sid, alternating = conversation(lambda i: urls[i % 2])
        for url in urls:
            history = httpx.get(f"{url}/v1/sessions/{sid}/messages").json()
            assert [m["content"] for m in history["data"][1::2]] == alternating
            assert [m["content"] for m in history["data"][0::2]] == lines
        # The same seed on one server alone gives the same lines.
        assert conversation(lambda i: urls[0])[1] == alternating

        # Lines sent to both servers at once: each is answered or refused, never interleaved.
        statuses = []
        barrier = threading.Barrier(2)

        def talk(url, i):
            barrier.wait()
            statuses.append(httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": f"both {i}"},
                                       timeout=60).status_code)

        for _ in range(4):
            threads = [threading.Thread(target=talk, args=(url, i)) for i, url in enumerate(urls)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        assert set(statuses) <= {200, 409} and 200 in statuses, "".join(log.read_text() for log in logs)
        history = httpx.get(f"{urls[1]}/v1/sessions/{sid}/messages").json()
        assert [m["role"] for m in history["data"]] == ["user", "assistant"] * (len(lines) + statuses.count(200))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
