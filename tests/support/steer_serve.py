"""``steer serve`` as users run it: a subprocess on a free port of 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


class SteerServe:
    def __init__(self, policy: Path, *args: str, env: dict[str, str] | None = None, new_session: bool = False,
                 drop_args: tuple[str, ...] = ()):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "steer.cli.main", "serve", "--policy", str(policy), "--port", str(self.port),
                     "--no-ui", "--threads", "1", "--log_level", "warning", *args]
        self.args = [a for a in self.args if a not in drop_args]
        self.new_session = new_session
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "SteerServe":
        # A session of its own: a signal to its process group then reaches the server and its
        # engine process, as Ctrl-C in a terminal does.
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=self.new_session)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"steer serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("steer serve did not become healthy")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 60) -> str:
        """Ends the server (SIGTERM, then SIGKILL if it does not go) and returns its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out

    def __exit__(self, *exc) -> None:
        self.stop()
