"""Overload: many concurrent clients against a small queue, for a bounded time.

    python bench/serve_overload.py [--policy DIR] [--clients 64] [--max-queue 16] [--max-batch-size 8]
                                   [--seconds 30] [--max-tokens 48]

`steer serve` runs as a subprocess with `--max-queue` waiting places and `--max-batch-size` batch
slots; `--clients` clients each send requests back to back (half of them streaming) until
`--seconds` have passed, honouring `Retry-After` on a 429/503 as a well-behaved client does.
Every response must be a 200 that completes, or a 429/503 carrying `Retry-After`; a request with no
answer within `--request-timeout` counts as hung. The server's resident memory (server process
plus engine process) is read after a warm-up and again after the run. Without --policy,
../shared/models/stories260K is wrapped as a policy directory in a temp folder.

Prints a JSON object, then a short table. The check (`ok`) is: no hang, no other status, every
refusal with Retry-After, and RSS after within 10% of before.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import PROMPTS, REPO, free_port, wrap_stories260k  # noqa: E402


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (the engine process), from /proc."""
    total = 0
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


async def one_request(client, url: str, body: dict, timeout: float) -> tuple[str, float]:
    """(outcome, seconds to wait before the next request). Outcomes: "200", "429+retry-after",
    "503+retry-after", "hung", or anything else ("429 without retry-after", "500", "cut stream")."""
    import httpx

    try:
        async with asyncio.timeout(timeout):
            if body.get("stream"):
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return _refusal(r)
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    done = lines and lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
                    return ("200", 0.0) if done else ("cut stream", 0.0)
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            if r.status_code == 200:
                return ("200", 0.0) if r.json()["choices"][0]["finish_reason"] in ("stop", "length") else ("bad 200", 0)
            return _refusal(r)
    except TimeoutError:
        return "hung", 0.0
    except httpx.HTTPError as e:
        return f"transport error {type(e).__name__} ({'stream' if body.get('stream') else 'plain'}: {e})", 0.0


def _refusal(r) -> tuple[str, float]:
    retry = r.headers.get("Retry-After")
    if r.status_code in (429, 503) and retry is not None:
        return f"{r.status_code}+retry-after", float(retry)
    return f"{r.status_code}{'' if retry else ' without retry-after'}", 0.0


async def run_load(url: str, clients: int, seconds: float, max_tokens: int, request_timeout: float) -> dict:
    import httpx

    outcomes: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    # A connection per request: a pooled keep-alive connection that the server closes after its
    # idle timeout just as a client reuses it fails on the client's side (a ReadError that says
    # nothing about the server), which would blur what this measures.
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=0)

    async def client_loop(i: int, client) -> None:
        n = 0
        while time.monotonic() < deadline:
            body = {"messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0.8, "seed": i * 1000 + n, "stream": i % 2 == 0}
            outcome, wait = await one_request(client, url, body, request_timeout)
            outcomes[outcome] += 1
            n += 1
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=limits, headers={"Connection": "close"}) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return {"outcomes": dict(outcomes), "wall_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(args.policy) if args.policy else wrap_stories260k(Path(tmp) / "policy")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen(
            [sys.executable, "-m", "steer.cli.main", "serve", "--policy", str(policy), "--port", str(port), "--no-ui",
             "--threads", str(args.threads), "--max_queue", str(args.max_queue),
             "--max_batch_size", str(args.max_batch_size), "--log_level", "warning"],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            import httpx

            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the server did not start:\n{server.stderr.read()[-3000:]}")
                time.sleep(0.2)
            # Warm-up: every code path (streaming, batching, refusals) has run once before the
            # first memory reading.
            asyncio.run(run_load(url, args.clients, 3.0, args.max_tokens, args.request_timeout))
            time.sleep(1.0)
            rss_before = rss_bytes(server.pid)
            load = asyncio.run(run_load(url, args.clients, args.seconds, args.max_tokens, args.request_timeout))
            time.sleep(1.0)
            rss_after = rss_bytes(server.pid)
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            health = httpx.get(f"{url}/health", timeout=10).status_code
        finally:
            server.terminate()
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                server.kill()

    outcomes = load["outcomes"]
    allowed = {"200", "429+retry-after", "503+retry-after"}
    growth = (rss_after - rss_before) / rss_before if rss_before else float("nan")
    report = {
        "clients": args.clients, "max_queue": args.max_queue, "max_batch_size": args.max_batch_size,
        "seconds": args.seconds, "max_tokens": args.max_tokens, **load,
        "requests": sum(outcomes.values()),
        "hung": outcomes.get("hung", 0),
        "unexpected": {k: v for k, v in outcomes.items() if k not in allowed},
        "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_growth": round(growth, 4),
        "health_after": health,
        "tokens_generated": next((float(line.split()[-1]) for line in metrics.splitlines()
                                  if line.startswith("steer_generated_tokens_total")), None),
    }
    report["ok"] = (not report["unexpected"] and report["hung"] == 0 and abs(growth) <= 0.10 and health == 200
                    and outcomes.get("200", 0) > 0)
    print(json.dumps(report, indent=2))
    print()
    print(f"{'outcome':<22}{'count':>8}")
    for outcome, count in sorted(outcomes.items()):
        print(f"{outcome:<22}{count:>8}")
    print(f"RSS {report['rss_before_mb']} MB -> {report['rss_after_mb']} MB ({growth:+.1%}); "
          f"{'OK' if report['ok'] else 'FAILED'}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
