"""Engines side by side on one GGUF file: `steer serve --engine llama.cpp` (its engine in a child
process, the default, or ``llama.cpp-in-process``: on a thread of the server), `steer serve --engine
torch`, llama.cpp's own `llama-server`, and steer over that llama-server (`steer serve --engine
llama.cpp --upstream URL`), at 1 client and at 16 concurrent clients, in the same run.

    python bench/engines.py [--policy FILE.gguf] [--schema NAME] [--engines llama.cpp,llama-server,...]
                            [--clients 1,16] [--lines-per-client 4] [--rounds 3] [--max-tokens 40]
                            [--threads 2] [--llama-server PATH]

Every request is a streaming chat completion of exactly --max-tokens tokens (``ignore_eos``), so
the engines do the same amount of work per line; each client sends its lines one after another.
All servers run at once and are measured in alternation, --rounds times (the machine's speed
drifts by a fifth from one minute to the next). Reported per engine and concurrency: tokens/s (all
completion tokens over the wall time; the median over rounds, and each round's), p50 time to first
token and p50 full-line latency over all lines. llama-server renders the prompt with the GGUF's own
chat template and steer with its template (for a chat GGUF without steer metadata: the same chat
template, with the attribute labels in the system message), so prompts differ by a few tokens
(``prompt_tokens``).

Defaults: the SmolLM2 demo policy exported to /tmp/smol-policy.gguf when that exists
(`steer export gguf --policy runs/smol-demo/policy --output /tmp/smol-policy.gguf --dtype q8_0`),
else the SmolLM2-135M-Instruct Q4_1 base from ../shared with --schema helpsteer. The llama-server
binary: --llama-server, else $STEER_LLAMA_SERVER, else `llama-server` on PATH; without one, the
llama-server rows are skipped with a note. Prints a JSON object, then a short table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import PROMPTS, free_port, open_chat_stream, percentile, wait_healthy  # noqa: E402

SMOL_POLICY = Path("/tmp/smol-policy.gguf")
SMOL_BASE = REPO.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_SERVER = os.environ.get("STEER_LLAMA_SERVER") or shutil.which("llama-server") or "llama-server"


async def timed_line(url: str, body: dict) -> dict:
    """One streaming chat completion: latency, time to the first content chunk, and tokens (from
    the final usage, or one per content chunk when a server sends no usage)."""
    start = time.perf_counter()
    reader, writer, head = await open_chat_stream(url, body)
    buffer, first = b"", None
    chunked = b"transfer-encoding: chunked" in head.lower()
    while True:
        data = await reader.read(65536)
        if not data:
            break
        buffer += data
        if first is None and any(_content(e) for e in _sse_events(buffer, chunked, partial=True)):
            first = time.perf_counter() - start
    writer.close()
    end = time.perf_counter()
    chunks, usage = 0, None
    for event in _sse_events(buffer, chunked):
        usage = event.get("usage") or usage
        chunks += bool(_content(event))
    return {"latency": end - start, "ttft": first if first is not None else end - start,
            "tokens": (usage or {}).get("completion_tokens") or chunks,
            "prompt_tokens": (usage or {}).get("prompt_tokens")}


def _content(event: dict) -> str:
    return (event["choices"][0].get("delta") or {}).get("content") or "" if event.get("choices") else ""


def _sse_events(raw: bytes, chunked: bool, partial: bool = False) -> list[dict]:
    """The ``data:`` events of a response body; ``partial``: a body still arriving (an event cut
    off at its end is skipped)."""
    if chunked:  # undo chunked transfer encoding
        out, rest = b"", raw
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        raw = out
    events = []
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if block.startswith(b"data: {"):
            try:
                events.append(json.loads(block[6:]))
            except json.JSONDecodeError:
                if not partial:
                    raise
    return events


async def load(url: str, bodies: list[dict], clients: int) -> tuple[list[dict], float]:
    async def client(mine):
        return [await timed_line(url, b) for b in mine]

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(client(bodies[c::clients]) for c in range(clients)))
    return [r for rs in per_client for r in rs], time.perf_counter() - t0


def bodies(n: int, max_tokens: int, steer: bool) -> list[dict]:
    out = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
                "temperature": 0.7, "seed": i, "ignore_eos": True}
        if steer:
            body["attributes"] = {}
        out.append(body)
    return out


UPSTREAM_KIND = "llama-server+steer"  # steer serve --engine llama.cpp --upstream <a llama-server>
THREAD_KIND = "llama.cpp-in-process"  # steer serve --engine llama.cpp --engine-in-process
KINDS = ("llama.cpp", THREAD_KIND, "torch", "llama-server", UPSTREAM_KIND)


def _popen(command: list[str], args) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if args.quiet else None)


def _llama_server(args, port: int) -> subprocess.Popen:
    return _popen([str(args.llama_server), "-m", args.policy, "-t", str(args.threads), "-np", str(args.parallel),
                   "-c", str(args.parallel * args.context), "--host", "127.0.0.1", "--port", str(port),
                   *args.llama_server_args.split()], args)


def start_servers(kind: str, args, port: int) -> list[subprocess.Popen]:
    """The server to measure on ``port`` (last in the list), after any upstream it needs."""
    if kind == "llama-server":
        return [_llama_server(args, port)]
    command = [sys.executable, "-m", "steer.cli.main", "serve", "--policy", args.policy, "--port", str(port),
               "--max-batch-size", str(args.parallel), "--no-ui"]
    if args.schema:
        command += ["--schema", args.schema]
    if kind == UPSTREAM_KIND:
        upstream_port = free_port()
        upstream = _llama_server(args, upstream_port)
        wait_healthy(f"http://127.0.0.1:{upstream_port}", upstream, timeout=300)
        return [upstream, _popen(command + ["--engine", "llama.cpp", "--upstream", f"http://127.0.0.1:{upstream_port}"],
                                 args)]
    engine = "llama.cpp" if kind == THREAD_KIND else kind
    command += ["--engine", engine]
    if engine == "llama.cpp" or args.torch_threads:
        command += ["--threads", str(args.threads if engine == "llama.cpp" else args.torch_threads)]
    if args.in_process or kind == THREAD_KIND:
        command += ["--engine-in-process"]
    return [_popen(command, args)]


def started(kind: str, args) -> tuple[str, list[subprocess.Popen]]:
    """Start ``kind``'s server(s) and warm it up; (its URL, the processes to stop afterwards)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers = start_servers(kind, args, port)
    try:
        wait_healthy(url, servers[-1], timeout=300)
        asyncio.run(load(url, bodies(2, args.max_tokens, kind != "llama-server"), 1))  # warm-up
    except BaseException:
        stop(servers)
        raise
    return url, servers


def stop(servers: list[subprocess.Popen]) -> None:
    for server in reversed(servers):
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def measure_round(kind: str, url: str, clients: int, args) -> list[dict]:
    """One round of ``clients`` concurrent clients, each sending --lines-per-client lines."""
    steer = kind != "llama-server"  # llama-server alone knows no `attributes`
    results, wall = asyncio.run(load(url, bodies(clients * args.lines_per_client, args.max_tokens, steer), clients))
    return [{**r, "wall": wall} for r in results]


def summarize(rounds: list[list[dict]]) -> dict:
    """Tokens/s: the median over rounds; TTFT and line latency: p50 over every line of every round."""
    lines = [r for rnd in rounds for r in rnd]
    per_round = [sum(r["tokens"] for r in rnd) / rnd[0]["wall"] for rnd in rounds]
    return {
        "lines": len(lines), "rounds": len(rounds), "tokens_per_s": round(statistics.median(per_round), 1),
        "tokens_per_s_by_round": [round(x, 1) for x in per_round],
        "ttft_p50_s": round(percentile([r["ttft"] for r in lines], 50), 3),
        "latency_p50_s": round(percentile([r["latency"] for r in lines], 50), 3),
        "prompt_tokens": statistics.median([r["prompt_tokens"] for r in lines if r["prompt_tokens"]] or [0]),
    }


def measure_all(kinds: list[str], args, notes: list[str]) -> dict:
    """Every kind's server runs at once; each of --rounds rounds measures every kind and
    concurrency in turn, starting with a different kind each round, so the machine's drift (a shared
    VM) falls on all of them alike."""
    running: dict[str, tuple[str, list[subprocess.Popen]]] = {}
    try:
        for kind in kinds:
            try:
                running[kind] = started(kind, args)
            except RuntimeError as e:  # one engine failing (a crash on this CPU) leaves the others' numbers
                notes.append(f"{kind} failed: {e}")
        order = list(running)
        results: dict[str, dict[int, list[list[dict]]]] = {k: {c: [] for c in args.clients} for k in order}
        for rnd in range(args.rounds):
            for kind in order[rnd % len(order):] + order[:rnd % len(order)] if order else []:
                for clients in args.clients:
                    results[kind][clients].append(measure_round(kind, running[kind][0], clients, args))
        return {kind: {str(c): summarize(rounds) for c, rounds in by.items()} for kind, by in results.items()}
    finally:
        for _, servers in running.values():
            stop(servers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=None, help="GGUF file (default: see above)")
    parser.add_argument("--schema", default=None, help="schema for a GGUF without steer metadata")
    parser.add_argument("--engines", default=f"llama.cpp,torch,llama-server,{UPSTREAM_KIND}",
                        help=f"which to measure: llama.cpp, {THREAD_KIND}, torch (steer serve --engine), llama-server "
                             f"(alone) and {UPSTREAM_KIND} (steer serve --engine llama.cpp --upstream, over a llama-server)")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--lines-per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="measure every engine this many times, in alternation; "
                        "tokens/s is the median over rounds")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (steer's engine and llama-server)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch engine threads (0: its default)")
    parser.add_argument("--parallel", type=int, default=16, help="batch slots (llama-server -np, steer --max-batch-size)")
    parser.add_argument("--context", type=int, default=1024, help="llama-server context per slot")
    parser.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    parser.add_argument("--llama-server-args", default="", help="extra llama-server flags, e.g. \"-nr\" (no weight "
                        "repacking: what avoids AMX on a VM whose CPU reports AMX it cannot run)")
    parser.add_argument("--in-process", action="store_true", help="steer's engines on a thread of the server "
                        "(--engine-in-process) instead of the engine process")
    parser.add_argument("--quiet", action="store_true", help="hide the servers' logs")
    args = parser.parse_args()
    if args.policy is None:
        if SMOL_POLICY.exists():
            args.policy = str(SMOL_POLICY)
        else:
            args.policy, args.schema = str(SMOL_BASE), args.schema or "helpsteer"
    args.clients = [int(c) for c in args.clients.split(",")]
    report = {"policy": args.policy, "max_tokens": args.max_tokens, "lines_per_client": args.lines_per_client,
              "rounds": args.rounds, "threads": args.threads, "parallel": args.parallel, "in_process": args.in_process, "cpus": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "engines": {}, "notes": []}
    kinds = []
    for kind in args.engines.split(","):
        if kind not in KINDS:
            parser.error(f"--engines: unknown engine {kind!r} (choose from {', '.join(KINDS)})")
        if kind in ("llama-server", UPSTREAM_KIND) and not args.llama_server.exists():
            report["notes"].append(f"{kind} skipped: {args.llama_server} does not exist (--llama-server PATH)")
            continue
        kinds.append(kind)
    report["engines"] = measure_all(kinds, args, report["notes"])
    print(json.dumps(report, indent=2))
    print(f"\n{'engine':<20}{'clients':>8}{'tokens/s':>10}{'TTFT p50':>10}{'line p50':>10}")
    for kind, by_clients in report["engines"].items():
        for clients, r in by_clients.items():
            print(f"{kind:<20}{clients:>8}{r['tokens_per_s']:>10.1f}{r['ttft_p50_s']:>10.3f}{r['latency_p50_s']:>10.3f}")
    for note in report["notes"]:
        print("note:", note)


if __name__ == "__main__":
    main()
