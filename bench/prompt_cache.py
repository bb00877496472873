"""The engine's prompt cache: time to first token of a conversation's next turn, with the cache and
without it, in one run.

    python bench/prompt_cache.py [--policy DIR|FILE.gguf] [--schema NAME] [--turns 6] [--reply-tokens 32]

A conversation is --turns turns: a user line, the policy's reply (--reply-tokens tokens, sampled
with a fixed seed), the next line, ... Each turn's prompt holds every earlier turn, so it grows.
Two engines (``steer.runtime.scheduler.Scheduler`` on their own threads, as the server runs its
engine; no HTTP) decode the same conversations, turn by turn in alternation: one with the prompt
cache (a request that ended leaves its prompt and reply in its slot's cache, and the next turn
copies them instead of feeding them), one without (``prompt_cache=False``, every prompt prefilled
whole). Both draw the same tokens (same seeds), which the benchmark checks, so the conversations
are the same on both sides. --conversations conversations run one after another (one request at
a time: time to first token alone).

Without --policy, ../shared/models/stories260K is wrapped as a policy (bench/serve_throughput.py).
Prints a JSON object, then a table: per turn, the prompt's length and the median time to first
token on each side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import wrap_stories260k  # noqa: E402

LINES = ["Hello! Who are you?", "Tell me about the village.", "What do you sell here?", "Is the road north safe?",
         "Can you tell me a story?", "What happened to the old mill?", "Where can I sleep tonight?",
         "Thank you, goodbye!"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=None, help="policy directory or .gguf file (default: stories260K wrapped)")
    parser.add_argument("--schema", default=None, help="attribute schema for a policy without steer metadata")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    from steer.runtime.generator import GenerationError, GenerationRequest, SteerGenerator
    from steer.runtime.scheduler import Scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="steer-bench-")
    try:
        policy = args.policy or str(wrap_stories260k(Path(tmp) / "policy"))
        generator = SteerGenerator.load(policy, device=args.device, schema=args.schema)
        engines = {cached: Scheduler(generator.model, generator.tokenizer, max_batch_size=16, max_queue=16,
                                     eos_token_ids=generator.eos_ids, device=generator.device, prompt_cache=cached)
                   for cached in (True, False)}
        for engine in engines.values():
            engine.start()
        try:
            turns = []  # per turn: prompt tokens, TTFT with and without the cache
            for conversation in range(args.conversations):
                messages = []
                for turn in range(args.turns):
                    messages.append({"role": "user", "content": LINES[(conversation + turn) % len(LINES)]})
                    try:
                        prepared = generator.prepare(GenerationRequest(
                            messages, {a.name: a.default for a in generator.schema.attributes},
                            max_new_tokens=args.reply_tokens, temperature=0.8, seed=100 * conversation + turn,
                            ignore_eos=True))
                    except GenerationError:  # the conversation no longer fits the model's context
                        break
                    if len(prepared.prompt_ids) + args.reply_tokens > (generator.max_context or 1 << 30):
                        break
                    replies, ttft = {}, {}
                    for cached, engine in engines.items():
                        row = prepared.row()
                        done = threading.Event()
                        row.sink = lambda event, done=done: done.set() if event.finished else None
                        engine.submit([row])
                        if not done.wait(600):
                            sys.exit("a reply did not finish in 10 minutes")
                        if row.error:
                            sys.exit(f"generation failed: {row.error}")
                        replies[cached], ttft[cached] = row.reply.text, row.first_token_at - row.submitted_at
                    turns.append({"conversation": conversation, "turn": turn, "prompt_tokens": len(prepared.prompt_ids),
                                  "ttft_cached_s": ttft[True], "ttft_uncached_s": ttft[False],
                                  "same_text": replies[True] == replies[False]})
                    messages.append({"role": "assistant", "content": replies[True]})
            stats = {cached: engine.stats() for cached, engine in engines.items()}
        finally:
            for engine in engines.values():
                engine.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    by_turn = {}
    for t in turns:
        by_turn.setdefault(t["turn"], []).append(t)
    per_turn = [{"turn": turn, "prompt_tokens": round(statistics.median(t["prompt_tokens"] for t in ts)),
                 "ttft_cached_s": round(statistics.median(t["ttft_cached_s"] for t in ts), 4),
                 "ttft_uncached_s": round(statistics.median(t["ttft_uncached_s"] for t in ts), 4)}
                for turn, ts in sorted(by_turn.items())]
    later = [t for t in turns if t["turn"] > 0]
    report = {
        "policy": args.policy or "stories260K (wrapped)",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "conversations": args.conversations,
        "reply_tokens": args.reply_tokens,
        "per_turn": per_turn,
        # Turns after the first (the first has nothing to copy): median TTFT, and the median of
        # each turn's uncached / cached ratio.
        "later_turns_ttft_cached_s": round(statistics.median(t["ttft_cached_s"] for t in later), 4) if later else None,
        "later_turns_ttft_uncached_s": round(statistics.median(t["ttft_uncached_s"] for t in later), 4)
        if later else None,
        "later_turns_speedup": round(statistics.median(t["ttft_uncached_s"] / t["ttft_cached_s"] for t in later), 2)
        if later else None,
        "prompt_tokens_fed": {"cached": stats[True].prompt_tokens_fed, "uncached": stats[False].prompt_tokens_fed},
        "prompt_tokens_copied": {"cached": stats[True].prompt_tokens_copied,
                                 "uncached": stats[False].prompt_tokens_copied},
        # Same seeds, so the cache must not change a token: every turn's reply is compared.
        "same_text_both_sides": all(t["same_text"] for t in turns),
    }
    print(json.dumps(report, indent=2))
    print()
    print(f"{'turn':>5}{'prompt tokens':>15}{'TTFT cached (s)':>18}{'uncached (s)':>15}")
    for t in per_turn:
        print(f"{t['turn']:>5}{t['prompt_tokens']:>15}{t['ttft_cached_s']:>18.4f}{t['ttft_uncached_s']:>15.4f}")
    if later:
        print(f"later turns: TTFT p50 {report['later_turns_ttft_cached_s']:.4f} s cached, "
              f"{report['later_turns_ttft_uncached_s']:.4f} s uncached ({report['later_turns_speedup']:.2f}x); "
              f"prompt tokens fed {stats[True].prompt_tokens_fed} vs {stats[False].prompt_tokens_fed}")
    if not report["same_text_both_sides"]:
        sys.exit("the two engines gave different replies to the same seeded request")


if __name__ == "__main__":
    main()
