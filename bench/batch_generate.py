"""Offline batch generation (``steer generate --input``, the steerability eval): fixed batches vs
continuous batching, same model, same requests, same run.

    python bench/batch_generate.py --policy DIR [--requests 48] [--batch-size 16] [--max-new-tokens 64]
    python bench/batch_generate.py --base-model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

``fixed``: the requests cut into batches of ``--batch-size``, each decoded until its longest reply
ends (how ``generate_file`` worked before continuous batching). ``continuous``: one call with
``max_batch_size=--batch-size``, where a waiting request takes the slot of the first reply to end
(what ``generate_file`` does now). The requests are the bundled held-out player lines over a grid
of requested values (the steerability eval's grid), seeded, so both modes make the same replies;
``--base-model`` decodes with the unmodified model asked in its system prompt (the eval's
baseline). Modes alternate within every repeat, so machine noise hits both alike. Prints a JSON
object, then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", help="policy directory")
    source.add_argument("--base-model", help="a chat model (hub id, directory or .gguf), asked in its system prompt")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from steer.runtime.generator import GenerationRequest, SteerGenerator
    from steer.training.steerability import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.policy:
        gen = SteerGenerator.load(args.policy, device="cpu")
    else:
        from steer.training.demo.pipeline import demo_schema
        from steer.training.prompt_baseline import load_baseline_generator

        gen = load_baseline_generator(args.base_model, demo_schema(), device="cpu", wording="words")
    prompts = load_prompts(None)
    names = gen.schema.names
    requests = [GenerationRequest(list(prompts[i % len(prompts)].messages), {names[i % len(names)]: i % 5},
                                  args.max_new_tokens, args.temperature, seed=i) for i in range(args.requests)]
    prepared = [gen.prepare(r) for r in requests]

    def fixed():
        out = []
        for i in range(0, len(prepared), args.batch_size):
            out += gen.generate_prepared(prepared[i:i + args.batch_size])
        return out

    def continuous():
        return gen.generate_prepared(prepared, max_batch_size=args.batch_size)

    modes = {"fixed": fixed, "continuous": continuous}
    seconds = {m: [] for m in modes}
    texts = {}
    for _ in range(args.repeats):
        for mode, run in modes.items():
            t = time.perf_counter()
            results = run()
            seconds[mode].append(time.perf_counter() - t)
            texts[mode] = [r.text for r in results]
    tokens = sum(r.completion_tokens for r in results)
    lengths = sorted(r.completion_tokens for r in results)
    report = {
        "model": args.policy or args.base_model, "requests": args.requests, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "completion_tokens": tokens,
        "reply_tokens_median": lengths[len(lengths) // 2], "reply_tokens_max": lengths[-1],
        "same_replies": texts["fixed"] == texts["continuous"],
        "threads": torch.get_num_threads(),
        "modes": {m: {"seconds_median": round(statistics.median(s), 2), "seconds": [round(x, 2) for x in s],
                      "tokens_per_second": round(tokens / statistics.median(s), 1)} for m, s in seconds.items()},
    }
    report["speedup"] = round(report["modes"]["fixed"]["seconds_median"]
                              / report["modes"]["continuous"]["seconds_median"], 2)
    print(json.dumps(report, indent=2))
    print(f"\n{'mode':<12} {'seconds':>8} {'tokens/s':>9}")
    for m, r in report["modes"].items():
        print(f"{m:<12} {r['seconds_median']:>8.2f} {r['tokens_per_second']:>9.1f}")
    print(f"continuous / fixed speedup: {report['speedup']}x  (replies: median {report['reply_tokens_median']}, "
          f"max {report['reply_tokens_max']} tokens; same replies: {report['same_replies']})")


if __name__ == "__main__":
    main()
