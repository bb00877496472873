"""Cost of APM-guided best-of-n: wall time per request at best-of-N vs best-of-1, same policy, same
prompts, same run.

    python bench/best_of.py --policy DIR --apm DIR [--sizes 1,8] [--prompts 16] [--max-new-tokens 64]
        [--repeats 2] [--attr humor=4] [--threads N]

Each request is sent on its own (``SteerGenerator.generate(..., best_of=N)``), the way one NPC line
or one chat turn is: best-of-N decodes its N candidates as one batch, then scores them in one APM
call. Sizes are interleaved within every repeat, so machine noise hits all of them alike. Prints a
JSON object, then a short table.
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
    parser.add_argument("--policy", required=True, help="policy directory")
    parser.add_argument("--apm", required=True, help="APM directory (picks the winners)")
    parser.add_argument("--sizes", default="1,8", help="comma-separated best-of sizes; the first is the reference")
    parser.add_argument("--prompts", type=int, default=16, help="bundled held-out player lines to use")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attr", default="humor=4", help="the requested attribute, name=value")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from steer.models.apm import AttributePredictor
    from steer.runtime.generator import SteerGenerator
    from steer.training.steerability import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    name, _, value = args.attr.partition("=")
    attributes = {name: int(value)}
    apm = AttributePredictor.load(args.apm, device="cpu")
    gen = SteerGenerator.load(args.policy, device="cpu", apm=apm)
    prompts = load_prompts(None)[: args.prompts]

    apm_seconds = {n: 0.0 for n in sizes}
    predict = apm.predict
    current = [sizes[0]]

    def timed_predict(*a, **kw):
        t = time.perf_counter()
        try:
            return predict(*a, **kw)
        finally:
            apm_seconds[current[0]] += time.perf_counter() - t

    apm.predict = timed_predict

    def request(n: int, p: int):
        return gen.generate(list(prompts[p].messages), attributes, max_new_tokens=args.max_new_tokens,
                            temperature=0.7, top_p=0.95, seed=100 + p, best_of=n)

    for n in sizes:  # warm-up: first-call allocations, thread pools
        current[0] = n
        request(n, 0)
    apm_seconds = {n: 0.0 for n in sizes}
    seconds = {n: [] for n in sizes}
    tokens = {n: 0 for n in sizes}
    distance = {n: [] for n in sizes}
    unscored = []
    for _ in range(args.repeats):
        for p in range(len(prompts)):
            for n in sizes:
                current[0] = n
                t = time.perf_counter()
                result = request(n, p)
                seconds[n].append(time.perf_counter() - t)
                tokens[n] += result.completion_tokens
                if result.measured is not None:
                    distance[n].append(abs(result.measured[name] - attributes[name]))
                else:  # plain generation: measured afterwards, outside the timing
                    unscored.append((n, p, result.text))
    col = apm.schema.names.index(name)
    for (n, p, text), row in zip(unscored, predict([list(prompts[p].messages) + [{"role": "assistant", "content": t}]
                                                    for _, p, t in unscored]) if unscored else []):
        distance[n].append(abs(row[col] - attributes[name]))
    ref = sizes[0]
    per = {n: statistics.mean(seconds[n]) for n in sizes}
    report = {
        "policy": args.policy, "apm": args.apm, "prompts": len(prompts), "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "attributes": attributes, "threads": torch.get_num_threads(),
        "seconds_per_request": {str(n): round(per[n], 4) for n in sizes},
        "median_seconds_per_request": {str(n): round(statistics.median(seconds[n]), 4) for n in sizes},
        "cost_vs_first": {str(n): round(per[n] / per[ref], 2) for n in sizes},
        "apm_share": {str(n): round(apm_seconds[n] / sum(seconds[n]), 3) for n in sizes},
        "winner_tokens_per_request": {str(n): round(tokens[n] / len(seconds[n]), 1) for n in sizes},
        "mean_abs_distance_to_request": {str(n): round(statistics.mean(distance[n]), 3) for n in sizes},
    }
    print(json.dumps(report, indent=2))
    print(f"\n{'best-of':>8} {'s/request':>10} {'x best-of-' + str(ref):>13} {'APM share':>10} {'|measured-requested|':>21}")
    for n in sizes:
        print(f"{n:>8} {per[n]:>10.3f} {per[n] / per[ref]:>13.2f} {apm_seconds[n] / sum(seconds[n]):>10.1%} "
              f"{statistics.mean(distance[n]):>21.3f}")


if __name__ == "__main__":
    main()
