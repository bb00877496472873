"""Serving throughput: 16 concurrent streaming clients against `steer serve` (continuous batching)
vs the same requests one at a time through `steer.runtime.generator.SteerGenerator`, same policy, same run.

    python bench/serve_throughput.py [--policy DIR] [--clients 16] [--requests-per-client 4] [--max-tokens 64]

Each client sends its requests one after another, so 16 are in flight until the last ones finish
(sustained load, as serving benchmarks measure it); `--requests-per-client 1` is a single wave,
where the batch drains as replies end and the last, longest reply sets the wall time.

The machine's speed drifts (a shared VM: the same sequential run varies by a third from one minute
to the next), so the two sides are measured in alternation: each of `--rounds` rounds runs half its
share of the requests one at a time, then all of them through the server, then the other half one
at a time; the speedup reported is the median over rounds of served tokens/s over the sequential
tokens/s measured around it.
Each round also measures the batching ceiling (``bench/decode_step.py``: --clients x one decode
step at batch 1 over one step at batch --clients, here in the same process and run), and the
report gives served/ceiling, the median over rounds of the round's speedup over its ceiling: how
much of what batching could buy the server delivers.

Without --policy, ../shared/models/stories260K is wrapped as a policy directory in a temp folder.
The server runs as a subprocess (`python -m steer.cli.main serve`), so clients and server do not share
a Python interpreter; the clients are a minimal asyncio HTTP/1.1 reader so that generating the
load costs little CPU next to serving it, each on one keep-alive connection for all its requests
(as pooled clients such as httpx and the OpenAI SDK keep theirs). Both sides use the same seeds,
so they generate the same tokens. Prints a JSON object (including CPU seconds per side and the 1-minute load average), then
a short table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_step.py, for the ceiling
PROMPTS = [
    "Tell me a story about a dragon.",
    "What should I pack for a trip to the mountains?",
    "Write a short poem about the sea.",
    "Why is the sky blue?",
    "Give me three tips for learning to cook.",
    "Describe a busy market in the morning.",
    "How do I keep a plant alive?",
    "Tell me a joke about a cat.",
]
ATTRIBUTE_SETS = [{"humor": 4}, {"creativity": 4}, {"helpfulness": 4, "humor": 0}, {}]


def wrap_stories260k(directory: Path) -> Path:
    from steer.core.artifacts import save_steer_config
    from steer.core.attributes import Attribute, AttributeSchema
    from steer.core.template import PromptTemplate

    source = Path(os.environ.get("STEER_SHARED", REPO.parent / "shared")) / "models" / "stories260K"
    if not source.is_dir():
        sys.exit(f"no --policy given and {source} is absent")
    schema = AttributeSchema(name="demo", attributes=(
        Attribute("helpfulness", 0, 4, 3, "How well the reply serves the user."),
        Attribute("humor", 0, 4, 0, "How funny the reply is."),
        Attribute("creativity", 0, 4, 1, "How original the reply is."),
    ))
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory / name)
    save_steer_config(directory, "policy", schema, PromptTemplate(schema).to_dict(), base_model=str(source),
                      adapter=None, name="stories260K")
    return directory


def requests_for(n: int, max_tokens: int, distinct: bool = False) -> list[dict]:
    """The benchmark's requests: 8 prompts x 4 attribute sets in turn, so request i asks what request
    i - 8 asked (with another seed), and each of 16 clients repeats one prompt. ``distinct``: every
    prompt is made unique, so that only the template's opening is shared between requests."""
    return [
        {
            "messages": [{"role": "user",
                          "content": PROMPTS[i % len(PROMPTS)] + (f" (Request {i}.)" if distinct else "")}],
            "attributes": ATTRIBUTE_SETS[i % len(ATTRIBUTE_SETS)],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "top_p": 0.95,
            "seed": 1000 + i,
        }
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KeepAlive:
    """One client's HTTP/1.1 connection, kept open from one request to its next, as a pooled client
    (httpx, the OpenAI SDK) keeps it: opened on first use, and again when the server closed it."""

    def __init__(self):
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @property
    def is_open(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def open_chat_stream(url: str, body: dict, conn: KeepAlive | None = None):
    """POST a streaming chat completion (usage included) on ``conn`` (kept open after the response)
    or on a fresh connection closed by the response; returns the reader, the writer and the
    response head once the status is 200, else raises with the body."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nConnection: %s\r\n\r\n"
               % (host.encode(), len(payload), b"close" if conn is None else b"keep-alive") + payload)
    reused = conn is not None and conn.is_open
    if reused:
        reader, writer = conn.reader, conn.writer
    else:
        reader, writer = await asyncio.open_connection(host, int(port))
        if conn is not None:
            conn.reader, conn.writer = reader, writer
    writer.write(request)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        if not reused:
            raise
        conn.close()  # the server closed the idle connection: once more on a new one
        return await open_chat_stream(url, body, conn)
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        if conn is not None:
            conn.close()
        raise RuntimeError(f"{url}: HTTP {status}: {(head + await reader.read()).decode(errors='replace')}")
    return reader, writer, head


async def stream_one(url: str, body: dict, conn: KeepAlive | None = None) -> dict:
    """One streaming chat completion over a plain asyncio connection (``conn``: kept open for the
    client's next request).

    The clients share one process and core with nothing but each other, yet httpx's per-chunk
    machinery (httpcore, h11, anyio) cost a third of what the server spent serving them, CPU taken
    from the server on a 2-core machine. This client does the minimum: HTTP/1.1, chunked
    transfer decoding, and one ``json.loads`` per server-sent event."""
    start = time.perf_counter()
    reused = conn is not None and conn.is_open
    reader, writer, head = await open_chat_stream(url, body, conn)
    chunked = b"transfer-encoding: chunked" in head.lower()
    arrivals: list[float] = []
    usage = None
    pending = b""
    while True:
        if chunked:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
        else:
            data = await reader.read(65536)
            if not data:
                break
        now = time.perf_counter()
        *events, pending = (pending + data).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            chunk = json.loads(event[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(now)
    if conn is None or not chunked or b"connection: close" in head.lower():
        writer.close()  # a body without chunked framing ends with the connection
        if conn is not None:
            conn.close()
    end = time.perf_counter()
    return {
        "ttft": arrivals[0] - start if arrivals else end - start,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "tokens": usage["completion_tokens"],
        "latency": end - start,
        "reused_connection": reused,
    }


async def run_concurrent(url: str, bodies: list[dict], clients: int) -> tuple[list[dict], float]:
    """``clients`` concurrent clients; client ``c`` sends bodies ``c``, ``c + clients``, ... in turn,
    on one keep-alive connection."""

    async def client(mine: list[dict]) -> list[dict]:
        conn = KeepAlive()
        try:
            return [await stream_one(url, b, conn) for b in mine]
        finally:
            conn.close()

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(client(bodies[c::clients]) for c in range(clients)))
    return [r for results in per_client for r in results], time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=None, help="policy directory (default: stories260K wrapped in a temp dir)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4,
                        help="requests each client sends one after another (1: a single wave)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6,
                        help="alternate this many sequential and served measurements (see the module docstring)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads on both sides (0: torch's default; 1 is fastest for tiny models)")
    parser.add_argument("--distinct-prompts", action="store_true",
                        help="make every request's prompt unique (by default each client repeats one prompt, "
                             "which the server's prompt cache copies instead of prefilling)")
    args = parser.parse_args()

    import torch

    from decode_step import ceiling_with_prefill, time_decode, time_joining, time_prefill

    from steer.runtime.generator import GenerationRequest, SteerGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="steer-bench-")
    try:
        policy = args.policy or str(wrap_stories260k(Path(tmp) / "policy"))
        bodies = requests_for(args.clients * args.requests_per_client, args.max_tokens, args.distinct_prompts)
        # Each round runs its share of the requests one at a time, then all of them served.
        shares = [bodies[r::args.rounds] for r in range(args.rounds)]
        generator = SteerGenerator.load(policy, device=args.device)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "steer.cli.main", "--log-level", "WARNING", "serve", "--policy", policy, "--port",
             str(port), "--no-ui", "--device", args.device, "--max-batch-size", str(max(16, args.clients)),
             "--log-level", "warning", "--threads", str(args.threads)],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
            cwd=str(REPO),
        )
        try:
            _wait_healthy(url, server)
            generator.generate(**_gen_kwargs({**bodies[0], "max_tokens": 4}))  # warm-up
            asyncio.run(stream_one(url, {**bodies[0], "max_tokens": 4}))
            seq_ttft = []
            for body in bodies[: args.clients]:
                start = time.perf_counter()
                generator.generate(**_gen_kwargs({**body, "max_tokens": 1}))  # time to one token, alone
                seq_ttft.append(time.perf_counter() - start)
            ceiling_prepared = [generator.prepare(GenerationRequest(**_gen_kwargs(b))) for b in bodies[:args.clients]]
            # The requests that follow the first wave, half a batch of which join a step at once.
            following = [generator.prepare(GenerationRequest(**_gen_kwargs(b)))
                         for b in bodies[args.clients:args.clients + args.clients // 2]]
            rounds = []
            def one_at_a_time(part: list[dict]) -> tuple[int, float, float]:
                t0, cpu0 = time.perf_counter(), time.process_time()
                tokens = sum(generator.generate(**_gen_kwargs(body)).completion_tokens for body in part)
                return tokens, time.perf_counter() - t0, time.process_time() - cpu0

            for share in shares:
                # Half the sequential requests just before the served run and half just after: a
                # drift of the machine's speed across the round then weighs on both sides alike.
                before = one_at_a_time(share[:len(share) // 2])
                server_cpu0, client_cpu0 = _cpu_seconds(server.pid), time.process_time()
                http_cpu0 = _cpu_seconds(server.pid, children=False)
                counters0 = _engine_counters(url)
                results, wall = asyncio.run(run_concurrent(url, bodies, args.clients))
                server_cpu, client_cpu = _cpu_seconds(server.pid) - server_cpu0, time.process_time() - client_cpu0
                http_cpu = _cpu_seconds(server.pid, children=False) - http_cpu0
                counters = _engine_counters(url)
                after = one_at_a_time(share[len(share) // 2:])
                seq_tokens, seq_time, seq_cpu = (a + b for a, b in zip(before, after))
                served_tokens = sum(r["tokens"] for r in results)
                ceiling = _ceiling(generator, ceiling_prepared, args.max_tokens, time_decode)
                # The same ceiling with each request's prefill counted on both sides (the one above
                # leaves prefills out): alone at batch 1, or joining a running step (what the
                # engine does, copying what a cache already holds).
                sync = (lambda: torch.cuda.synchronize()) if generator.device.type == "cuda" else (lambda: None)
                prefill_ms = time_prefill(generator, ceiling_prepared, sync)
                joining_ms = time_joining(generator, ceiling_prepared, following, sync) if following else float("nan")
                alone_tokens, alone_s = _engine_alone(generator, bodies, args.clients)
                rounds.append({
                    "sequential_tokens": seq_tokens, "sequential_s": seq_time, "sequential_cpu_s": seq_cpu,
                    "served_tokens": served_tokens, "served_s": wall, "server_cpu_s": server_cpu, "http_cpu_s": http_cpu,
                    "client_cpu_s": client_cpu, "results": results,
                    "engine_tokens": counters["tokens"] - counters0["tokens"],
                    "engine_steps": counters["steps"] - counters0["steps"],
                    "speedup": (served_tokens / wall) / (seq_tokens / seq_time),
                    "prompt_tokens_fed": counters["prompt_fed"] - counters0["prompt_fed"],
                    "prompt_tokens_copied": counters["prompt_copied"] - counters0["prompt_copied"],
                    "prefill_ms": prefill_ms, "joining_ms_per_prompt": joining_ms,
                    "ceiling_with_prefill": ceiling_with_prefill(
                        ceiling["one"], ceiling["many"], args.clients, prefill_ms, joining_ms,
                        served_tokens / len(bodies)),
                    "engine_alone_speedup": (alone_tokens / alone_s) / (seq_tokens / seq_time),
                    "served_over_engine_alone": (served_tokens / wall) / (alone_tokens / alone_s),
                    **ceiling,
                })
            server_ttft = _server_mean_ttft(url)
        finally:
            server.terminate()
            server.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = [r for rnd in rounds for r in rnd["results"]]
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    seq_tokens = sum(r["sequential_tokens"] for r in rounds)
    seq_time = sum(r["sequential_s"] for r in rounds)
    seq_cpu = sum(r["sequential_cpu_s"] for r in rounds)
    seq_tps = seq_tokens / seq_time
    served_tps = statistics.median(r["served_tokens"] / r["served_s"] for r in rounds)
    speedup = statistics.median(r["speedup"] for r in rounds)
    served_cpu = sum(r["server_cpu_s"] + r["client_cpu_s"] for r in rounds)
    ceiling = statistics.median(r["ceiling_with_sampling"] for r in rounds)
    forward_ceiling = statistics.median(r["batching_ceiling"] for r in rounds)
    of_ceiling = statistics.median(r["speedup"] / r["ceiling_with_sampling"] for r in rounds)
    of_forward_ceiling = statistics.median(r["speedup"] / r["batching_ceiling"] for r in rounds)
    alone_of_ceiling = statistics.median(r["engine_alone_speedup"] / r["ceiling_with_sampling"] for r in rounds)
    served_of_alone = statistics.median(r["served_over_engine_alone"] for r in rounds)
    prefill_ceiling = statistics.median(r["ceiling_with_prefill"] for r in rounds)
    of_prefill_ceiling = statistics.median(r["speedup"] / r["ceiling_with_prefill"] for r in rounds)
    fed = sum(r["prompt_tokens_fed"] for r in rounds)
    copied = sum(r["prompt_tokens_copied"] for r in rounds)
    served_tokens_all = sum(r["served_tokens"] for r in rounds)
    report = {
        "policy": args.policy or "stories260K (wrapped)",
        "clients": args.clients,
        "requests": len(bodies),
        "max_tokens": args.max_tokens,
        "distinct_prompts": args.distinct_prompts,
        "rounds": args.rounds,
        "device": args.device,
        "threads": args.threads,
        "sequential": {"tokens": seq_tokens, "seconds": round(seq_time, 3), "tokens_per_s": round(seq_tps, 1),
                       "ttft_p50_s": round(statistics.median(seq_ttft), 4), "cpu_s": round(seq_cpu, 3)},
        "served": {
            "tokens_per_round": rounds[0]["served_tokens"],
            "tokens_per_s": round(served_tps, 1),  # median over rounds
            "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p95_s": round(percentile(ttfts, 95), 4),
            "itl_p50_s": round(percentile(gaps, 50), 4), "itl_p95_s": round(percentile(gaps, 95), 4),
            "latency_p50_s": round(percentile([r["latency"] for r in results], 50), 3),
            # Requests sent on a connection their client had kept open (all but each client's first).
            "requests_on_kept_connections": sum(r["reused_connection"] for r in results),
            # From /metrics: accepted by the server -> first content, averaged (excludes client overhead).
            "server_ttft_mean_s": round(server_ttft, 4),
            # CPU seconds used by the served runs (server and its engine process; the clients): on a
            # shared machine these say more than wall time about where the work goes.
            "server_cpu_s": round(sum(r["server_cpu_s"] for r in rounds), 3),
            "client_cpu_s": round(sum(r["client_cpu_s"] for r in rounds), 3),
            # The server process alone (HTTP, validation, prompts, streaming; not the engine process)
            # per request: what each request costs the server beside its decoding (median over rounds).
            "http_cpu_ms_per_request": round(statistics.median(1e3 * r["http_cpu_s"] / len(bodies) for r in rounds), 3),
            # From /metrics: generated tokens per decode step, the batch the engine actually ran
            # (at most --clients; lower when rows wait on their clients' next request).
            "rows_per_step": round(sum(r["engine_tokens"] for r in rounds) / max(1, sum(r["engine_steps"] for r in rounds)), 2),
            # From /metrics: the served prompts' tokens the engine copied from its cache instead of
            # prefilling them (the sequential side prefills every prompt whole).
            "prompt_tokens_fed": int(fed), "prompt_tokens_copied": int(copied),
            "prompt_copied_share": round(copied / max(1, fed + copied), 3),
        },
        "rounds_detail": [
            {"sequential_tokens_per_s": round(r["sequential_tokens"] / r["sequential_s"], 1),
             "served_tokens_per_s": round(r["served_tokens"] / r["served_s"], 1), "speedup": round(r["speedup"], 2),
             "engine_alone_speedup": round(r["engine_alone_speedup"], 2),
             "ceiling_with_sampling": round(r["ceiling_with_sampling"], 2),
             "batching_ceiling": round(r["batching_ceiling"], 2),
             "ceiling_with_prefill": round(r["ceiling_with_prefill"], 2),
             "prefill_ms": round(r["prefill_ms"], 3), "joining_ms_per_prompt": round(r["joining_ms_per_prompt"], 3)}
            for r in rounds
        ],
        "load_average_1m": round(os.getloadavg()[0], 2),
        # Median over rounds of (served tokens/s) / (sequential tokens/s) measured next to each other.
        "speedup": round(speedup, 2),
        # The batching ceiling measured in this run (median over rounds; bench/decode_step.py's two
        # numbers: decode step plus sampling, and the forward alone), and the speedup's share of it
        # (median over rounds of speedup / that round's ceiling).
        "ceiling_with_sampling": round(ceiling, 2),
        "batching_ceiling": round(forward_ceiling, 2),
        "served_over_ceiling": round(of_ceiling, 3),
        "served_over_forward_ceiling": round(of_forward_ceiling, 3),
        # Where the rest goes: the same load through the scheduler in this process (no HTTP, no
        # engine process, each client's next request submitted the moment its last one ends),
        # over the ceiling; and the server's tokens/s over that.
        "engine_alone_over_ceiling": round(alone_of_ceiling, 3),
        "served_over_engine_alone": round(served_of_alone, 3),
        # bench/decode_step.py's ceiling with every request's prefill counted, alone and joining
        # (this load's prompts; see --distinct-prompts), and the speedup over it.
        "ceiling_with_prefill": round(prefill_ceiling, 2),
        "served_over_ceiling_with_prefill": round(of_prefill_ceiling, 3),
        # Tokens per CPU-second, served (server + clients) over sequential.
        "cpu_speedup": round((served_tokens_all / served_cpu) / (seq_tokens / seq_cpu), 2),
        "targets": {"speedup>=8": speedup >= 8, "ttft_p50<=0.3s": percentile(ttfts, 50) <= 0.3,
                    "served/ceiling>=0.9": of_ceiling >= 0.9},
    }
    print(json.dumps(report, indent=2))
    print()
    print(f"{'':<28}{'sequential':>12}{'served x' + str(args.clients):>14}")
    print(f"{'tokens per round':<28}{seq_tokens / args.rounds:>12.0f}{rounds[0]['served_tokens']:>14}")
    print(f"{'aggregate tokens/s':<28}{seq_tps:>12.1f}{served_tps:>14.1f}")
    print(f"{'speedup (median of rounds)':<28}{'':>12}{speedup:>13.2f}x")
    per_round = " ".join(f"{r['speedup']:.2f}" for r in rounds)
    print(f"{'per-round speedups':<28}{'':>12}{per_round:>14}")
    print(f"{'TTFT p50 / p95 (s)':<28}{statistics.median(seq_ttft):>12.3f}"
          f"{percentile(ttfts, 50):>7.3f} / {percentile(ttfts, 95):.3f}")
    print(f"{'inter-token p50 / p95 (s)':<28}{'':>12}{percentile(gaps, 50):>7.4f} / {percentile(gaps, 95):.4f}")
    print(f"{'server CPU per request':<28}{'':>12}{report['served']['http_cpu_ms_per_request']:>11.3f} ms  (the HTTP process, not the engine)")
    print(f"{'rows per decode step':<28}{'':>12}{report['served']['rows_per_step']:>14.2f}")
    print(f"{'batching ceiling (median)':<28}{'':>12}{ceiling:>13.2f}x  (forward alone {forward_ceiling:.2f}x)")
    print(f"{'served / ceiling':<28}{'':>12}{of_ceiling:>14.3f}  (of the forward's {of_forward_ceiling:.3f})")
    print(f"{'engine alone / ceiling':<28}{'':>12}{alone_of_ceiling:>14.3f}  (no HTTP, no engine process)")
    print(f"{'served / engine alone':<28}{'':>12}{served_of_alone:>14.3f}")
    print(f"{'ceiling with prefills':<28}{'':>12}{prefill_ceiling:>13.2f}x  (served / it {of_prefill_ceiling:.3f})")
    print(f"{'prompt tokens copied':<28}{'':>12}{copied / max(1, fed + copied):>14.1%}  "
          f"({int(copied)} of {int(fed + copied)}; the sequential side prefills all)")


def _ceiling(generator, prepared, tokens: int, time_decode) -> dict[str, float]:
    """bench/decode_step.py's batching ceiling, measured now: batch 1 against batch len(prepared)."""
    sync = lambda: None  # noqa: E731  (CPU; CUDA runs would synchronise, as decode_step.py does)
    if generator.device.type == "cuda":
        import torch

        sync = torch.cuda.synchronize
    one, many = time_decode(generator, [prepared[:1], prepared], tokens, sync)
    n = len(prepared)
    return {"batching_ceiling": n * one["step_ms"] / many["step_ms"],
            "ceiling_with_sampling": n * (one["step_ms"] + one["sample_ms"]) / (many["step_ms"] + many["sample_ms"]),
            "one": one, "many": many}


def _engine_alone(generator, bodies: list[dict], clients: int) -> tuple[int, float]:
    """The served load without the server: ``clients`` streams of ``bodies`` through one
    :class:`~steer.runtime.scheduler.Scheduler` on its own thread in this process, each stream's
    next request submitted from the sink the moment its previous reply ends. Returns (tokens, s)."""
    import threading

    from steer.runtime.generator import GenerationRequest
    from steer.runtime.scheduler import Row, Scheduler

    prepared = [generator.prepare(GenerationRequest(**_gen_kwargs(b))) for b in bodies]
    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=clients, max_queue=len(prepared),
                       eos_token_ids=generator.eos_ids, device=generator.device)
    queues = [prepared[c::clients] for c in range(clients)]
    left = [len(prepared)]
    done = threading.Event()

    def row_for(client: int) -> Row:
        p = queues[client].pop(0)
        return Row(prompt_ids=list(p.prompt_ids), params=p.params, stops=p.stops, sink=sink_for(client))

    def sink_for(client: int):
        def sink(event) -> None:
            if not event.finished:
                return
            left[0] -= 1
            if queues[client]:
                engine.submit([row_for(client)])
            elif left[0] == 0:
                done.set()
        return sink

    first = [row_for(c) for c in range(clients) if queues[c]]
    engine.start()
    start = time.perf_counter()
    engine.submit(first)
    done.wait()
    elapsed = time.perf_counter() - start
    tokens = engine.stats().tokens_total
    engine.stop()
    return tokens, elapsed


def _cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU time of process ``pid`` and (``children``) its children (the engine
    process), from /proc; NaN elsewhere."""
    try:
        # Each thread lists the children it started (the engine process starts from a worker thread).
        kids = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if not children:
        return own
    return own + sum(_cpu_seconds(int(child)) for child in kids)


def _scrape(url: str) -> dict[str, float]:
    """The server's unlabelled Prometheus samples, by sample name."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def _engine_counters(url: str) -> dict[str, float]:
    samples = _scrape(url)
    return {"tokens": samples["steer_generated_tokens_total"], "steps": samples["steer_decode_steps_total"],
            "prompt_fed": samples.get("steer_prompt_tokens_fed_total", 0.0),
            "prompt_copied": samples.get("steer_prompt_tokens_copied_total", 0.0)}


def _server_mean_ttft(url: str) -> float:
    samples = _scrape(url)
    return samples["steer_time_to_first_token_seconds_sum"] / max(samples["steer_time_to_first_token_seconds_count"], 1)


def _gen_kwargs(body: dict) -> dict:
    return {"messages": body["messages"], "attributes": body["attributes"], "max_new_tokens": body["max_tokens"],
            "temperature": body["temperature"], "top_p": body["top_p"], "seed": body["seed"]}


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``server`` answers /health with 200; RuntimeError if it exits or takes longer."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    """:func:`wait_healthy` for a benchmark that cannot go on without its server: exit with the reason."""
    try:
        wait_healthy(url, server, timeout)
    except RuntimeError as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
