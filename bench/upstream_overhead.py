"""What steer's side of an upstream engine costs: tokens/s through ``UpstreamEngine`` (HTTP, SSE,
JSON, then steer's ReplyState and detokenizing and the row events) against a bare httpx client that
only reads the same streams (HTTP, SSE, JSON), in the same run, from the same upstream.

The upstream is a stand-in that speaks llama-server's (or vLLM's) streaming API and sends a fixed
reply of real stories260K token ids as fast as it can, in a process of its own, so what is measured
is the client side: a real llama-server or vLLM is far slower than either client, and the ratio
says how close to the upstream's own tokens/s steer can stay. Rounds alternate the two clients;
the median of each is reported.

    python bench/upstream_overhead.py --streams 1 16 --tokens 256 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORY = ("Once upon a time, there was a little cat named Tom. Tom liked to play in the garden with his "
         "friend, a small dog. One day they found a big red ball under a tree and played until the sun went down.")


def serve(port: int, tokens: list[int], api: str) -> None:
    """The stand-in upstream (run in its own process): every completion streams ``tokens``."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def event(i: int, token: int) -> dict:
        if api == "llama-server":
            return {"content": "", "tokens": [token], "stop": False, "tokens_predicted": i + 1}
        choice = {"index": 0, "text": "", "logprobs": {"tokens": [f"token_id:{token}"]}, "finish_reason": None}
        return {"choices": [choice]}

    async def events(n: int):
        for i, token in enumerate(tokens[:n]):
            yield f"data: {json.dumps(event(i, token))}\n\n"
        if api == "llama-server":
            yield 'data: {"content": "", "tokens": [], "stop": true, "stop_type": "limit"}\n\n'
        else:
            yield 'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\ndata: [DONE]\n\n'

    async def completion(request):
        body = await request.json()
        n = body.get("n_predict") or body.get("max_tokens")
        return StreamingResponse(events(n), media_type="text/event-stream")

    routes = [Route("/health", lambda r: JSONResponse({"status": "ok"})),
              Route("/props", lambda r: JSONResponse({"default_generation_settings": {"n_ctx": 4096}})),
              Route("/v1/models", lambda r: JSONResponse({"data": [{"id": "policy", "max_model_len": 4096}]})),
              Route("/completion", completion, methods=["POST"]),
              Route("/v1/completions", completion, methods=["POST"])]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning")


def raw_client(url: str, path: str, body: dict, streams: int) -> float:
    """Seconds for ``streams`` concurrent streams read by a bare client (parse every event's JSON)."""
    import httpx

    async def one(client):
        async with client.stream("POST", url + path, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    json.loads(line[5:])

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=streams + 2)) as client:
            start = time.perf_counter()
            await asyncio.gather(*(one(client) for _ in range(streams)))
            return time.perf_counter() - start

    return asyncio.run(main())


def steer_client(engine, tokenizer, prompt: list[int], n_tokens: int, streams: int) -> float:
    """Seconds for ``streams`` concurrent rows through ``UpstreamEngine`` (events to a sink)."""
    from steer.runtime.rows import Row
    from steer.runtime.sampling import SamplingParams

    done = threading.Semaphore(0)

    def sink(event):
        if event.finished:
            done.release()

    rows = [Row(prompt_ids=prompt, params=SamplingParams(max_new_tokens=n_tokens, temperature=0.0, ignore_eos=True),
                stops=["\n<extra_id_1>"], sink=sink) for _ in range(streams)]
    start = time.perf_counter()
    engine.submit(rows)
    for _ in rows:
        done.acquire()
    elapsed = time.perf_counter() - start
    bad = [r for r in rows if r.finish_reason != "length" or len(r.generated) != n_tokens]
    if bad:
        raise SystemExit(f"a row ended wrongly: {bad[0].finish_reason} {bad[0].error}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", choices=["llama-server", "vllm"], default="llama-server")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", default=str(Path(os.environ.get("STEER_SHARED", REPO.parent / "shared"))
                                                   / "models" / "stories260K"))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the stand-in upstream
    args = parser.parse_args()

    from steer.models.modeling import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    story = tokenizer.encode(STORY, add_special_tokens=False)
    script = (story * (args.tokens // len(story) + 1))[:args.tokens]
    if args.serve:
        serve(args.serve, script, args.api)
        return

    from steer.runtime.upstream import UpstreamEngine

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--api", args.api, "--tokens",
                               str(args.tokens), "--tokenizer", args.tokenizer])
    results = []
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        prompt = story[:16]
        path, body = ("/completion", {"prompt": prompt, "n_predict": args.tokens, "stream": True}) \
            if args.api == "llama-server" else \
            ("/v1/completions", {"prompt": prompt, "max_tokens": args.tokens, "stream": True})
        for streams in args.streams:
            engine = UpstreamEngine(url, api=args.api, tokenizer=tokenizer, max_batch_size=streams, max_queue=0)
            engine.start()
            raw, steer = [], []
            for _ in range(args.rounds):
                raw.append(raw_client(url, path, body, streams))
                steer.append(steer_client(engine, tokenizer, prompt, args.tokens, streams))
            engine.stop()
            tokens = streams * args.tokens
            row = {"api": args.api, "streams": streams, "tokens_per_stream": args.tokens, "rounds": args.rounds,
                   "raw_tokens_per_s": round(tokens / statistics.median(raw)),
                   "steer_tokens_per_s": round(tokens / statistics.median(steer))}
            row["steer_over_raw"] = round(row["steer_tokens_per_s"] / row["raw_tokens_per_s"], 3)
            results.append(row)
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps(results, indent=2))
    print(f"{'streams':>8} {'raw tok/s':>10} {'steer tok/s':>12} {'steer/raw':>10}")
    for r in results:
        print(f"{r['streams']:>8} {r['raw_tokens_per_s']:>10} {r['steer_tokens_per_s']:>12} {r['steer_over_raw']:>10}")


if __name__ == "__main__":
    main()
