"""A throwaway PostgreSQL server for the NPC session tests.

``STEER_TEST_POSTGRES_URL`` points the tests at an existing server. Otherwise Debian's
``postgresql`` package is used to start a private cluster on 127.0.0.1 in a temporary directory
(as the ``postgres`` user when running as root). Without PostgreSQL the tests skip, unless
``STEER_REQUIRE_POSTGRES=1`` (as ``.ci/run`` sets), where they fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _unavailable(reason: str):
    if os.environ.get("STEER_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (STEER_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"{reason}; install it with `apt-get install postgresql` (.ci/run does) "
                "or set STEER_TEST_POSTGRES_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres_server():
    """Yields a ``postgresql://`` URL of an empty database."""
    if os.environ.get("STEER_TEST_POSTGRES_URL"):
        yield os.environ["STEER_TEST_POSTGRES_URL"]
        return
    bindir = _pg_bin()
    if bindir is None:
        _unavailable("PostgreSQL's initdb is not installed")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            import pwd

            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("there is no 'postgres' user to run the server as")
    data = Path(tempfile.mkdtemp(prefix="steer-pg-"))
    if as_root:
        os.chown(data, pg_user.pw_uid, pg_user.pw_gid)
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    port = free_port()
    log = data / "server.log"
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "steer",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(log), "-w", "-t", "60",
                        "-o", f"-h 127.0.0.1 -p {port} -k {data} -F", "start"], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        shutil.rmtree(data, ignore_errors=True)
        _unavailable(f"a test PostgreSQL server could not start: {detail[0]}")
    try:
        import psycopg

        with psycopg.connect(f"postgresql://steer@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE steer_test")
        yield f"postgresql://steer@127.0.0.1:{port}/steer_test"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
