"""NPC line latency: time to first token and full-reply time of one NPC line through a dialogue
session (`POST /v1/sessions/{id}/messages`, streamed), alone and while 16 other sessions talk.

    python bench/npc_latency.py [--policy DIR] [--lines 12] [--others 16] [--database-url URL]

Baseline in the same run: the same prompt (the NPC's system prompt and the player's line) sent
as a plain streamed chat completion, so the difference is what sessions cost (database lease,
history, commit). The two are measured in alternation, line by line. Each probe line starts a
fresh session so both sides see the same prompt.

Policy: --policy, else the demo policy at /work/exp/demo/policy when present, else stories260K
wrapped as a policy (bench/serve_throughput.py). The server is a `steer serve` subprocess with
the example NPCs (examples/npcs) and a SQLite database in a temporary folder. Prints a JSON
object, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from serve_throughput import _wait_healthy, free_port, wrap_stories260k  # noqa: E402

from steer.npc import dialogue_messages, load_profile  # noqa: E402

DEMO_POLICY = Path("/work/exp/demo/policy")
LINES = ["Good morning!", "Can you fix my sword?", "What news from the hills?", "How much for a room?",
         "Have you seen any wolves?", "Tell me about yourself.", "Is the mine really closed?", "Farewell!"]


def sse(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[6:])


def npc_line(client: httpx.Client, npc: str, line: str, seed: int) -> dict:
    sid = client.post("/v1/npcs/{}/sessions".format(npc), json={"seed": seed}).json()["id"]
    start = time.perf_counter()
    first = None
    with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": line, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        for event in sse(r):
            if event.get("type") == "delta" and event["content"] and first is None:
                first = time.perf_counter()
            if event.get("type") == "message":
                final = event
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "total": end - start, "text": final["content"],
            "seed": final["seed"], "attributes": final["attributes"], "sid": sid}


def chat_line(client: httpx.Client, messages: list, attributes: dict, seed: int, max_tokens: int) -> dict:
    body = {"messages": messages, "attributes": attributes, "seed": seed, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    first, text = None, ""
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        for event in sse(r):
            piece = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if piece:
                first = first or time.perf_counter()
                text += piece
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "total": end - start, "text": text.replace("\x00", "")}


def measure(url: str, lines: int, profiles: dict) -> dict:
    npc_results, chat_results = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(lines):
            npc = ["brom", "lysa", "captain-ardent"][i % 3]
            line = LINES[i % len(LINES)]
            got = npc_line(client, npc, line, seed=100 + i)
            npc_results.append(got)
            messages = dialogue_messages(profiles[npc], [], line)
            chat_results.append(chat_line(client, messages, got["attributes"], got["seed"], profiles[npc].max_tokens))
    return {"npc_session": npc_results, "chat_completion": chat_results}


def background(url: str, others: int, stop: threading.Event, counts: list[int], errors: list[str]) -> list[threading.Thread]:
    def talk(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            sid = client.post(f"/v1/npcs/{['lysa', 'brom'][i % 2]}/sessions", json={"seed": i}).json()["id"]
            turn = 0
            while not stop.is_set():
                r = client.post(f"/v1/sessions/{sid}/messages", json={"content": LINES[turn % len(LINES)]})
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    return
                counts[i] += 1
                turn += 1

    threads = [threading.Thread(target=talk, args=(i,), daemon=True) for i in range(others)]
    for t in threads:
        t.start()
    return threads


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": round(statistics.median(values), 4),
            "p90": round(values[min(len(values) - 1, int(0.9 * len(values)))], 4),
            "mean": round(statistics.fmean(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=None)
    parser.add_argument("--lines", type=int, default=12, help="probe lines per phase")
    parser.add_argument("--others", type=int, default=16, help="sessions talking in the background in phase 2")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary folder")
    parser.add_argument("--threads", type=int, default=None, help="engine torch threads (server default)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="npc-bench-"))
    policy = Path(args.policy) if args.policy else (DEMO_POLICY if DEMO_POLICY.is_dir()
                                                    else wrap_stories260k(tmp / "policy"))
    db = args.database_url or f"sqlite:///{tmp / 'sessions.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "steer.cli.main", "serve", "--policy", str(policy), "--npcs", str(REPO / "examples" / "npcs"),
           "--database-url", db, "--port", str(port), "--no-ui", "--log-level", "warning"]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    profiles = {p.stem: load_profile(p) for p in (REPO / "examples" / "npcs").glob("*.yaml")}
    profiles = {p.id: p for p in profiles.values()}
    try:
        _wait_healthy(url, server)
        measure(url, 2, profiles)  # warm-up
        alone = measure(url, args.lines, profiles)
        stop, counts, errors = threading.Event(), [0] * args.others, []
        threads = background(url, args.others, stop, counts, errors)
        time.sleep(2.0)  # let the crowd reach a steady state
        t0 = time.perf_counter()
        loaded = measure(url, args.lines, profiles)
        elapsed = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join(timeout=120)
        if errors:
            raise RuntimeError(f"background sessions failed: {errors[:3]}")
    finally:
        server.terminate()
        server.wait(timeout=60)

    report = {"policy": str(policy), "database": db.split(":")[0], "lines": args.lines, "others": args.others,
              "background_lines_per_s": round(sum(counts) / elapsed, 2), "phases": {}}
    for name, phase in (("alone", alone), (f"with_{args.others}_sessions", loaded)):
        report["phases"][name] = {side: {"ttft_s": summary([r["ttft"] for r in rows]),
                                         "total_s": summary([r["total"] for r in rows]),
                                         "mean_chars": round(statistics.fmean(len(r["text"]) for r in rows), 1)}
                                  for side, rows in phase.items()}
        # Same prompt, attributes and seed on both sides: the same line, or sessions changed the output.
        report["phases"][name]["same_text"] = sum(a["text"] == b["text"] for a, b in
                                                  zip(phase["npc_session"], phase["chat_completion"]))
    print(json.dumps(report, indent=2))
    print()
    print(f"{'phase':<22}{'endpoint':<18}{'TTFT p50':>10}{'TTFT p90':>10}{'full p50':>10}{'full p90':>10}")
    for name, phase in report["phases"].items():
        for side, stats in phase.items():
            if side == "same_text":
                continue
            print(f"{name:<22}{side:<18}{stats['ttft_s']['p50']:>10.3f}{stats['ttft_s']['p90']:>10.3f}"
                  f"{stats['total_s']['p50']:>10.3f}{stats['total_s']['p90']:>10.3f}")
        print(f"{name:<22}same line from both endpoints: {phase['same_text']} of {args.lines}")


if __name__ == "__main__":
    main()
