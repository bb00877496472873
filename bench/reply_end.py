"""Do replies end? SFT of stories260K (whose vocabulary splits the template's markers) with the
markers added as single tokens (the default) and without (``--no-add-marker-tokens``), same data,
steps and seed; then greedy and sampled replies to held-out NPC lines. Prints JSON and a short table:
the share of replies that end by themselves (finish_reason "stop") and the share that leak marker
pieces or control characters.

    python bench/reply_end.py --base ../shared/models/stories260K --steps 60 --prompts 24 --out /tmp/reply-end
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

LEAK = re.compile(r"extra|_id|<extra|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def run(base: str, out: Path, add: bool, steps: int, prompts: list[dict], seed: int) -> dict:
    from steer.demo_data import rated_path
    from steer.runtime.generator import GenerationRequest, SteerGenerator
    from steer.training.sft import SftConfig, main

    policy = out / ("markers-added" if add else "markers-split")
    start = time.perf_counter()
    metrics = main(SftConfig(base_model=base, data=str(rated_path()), output_dir=str(policy), max_steps=steps,
                             learning_rate=5e-3,
                             per_device_train_batch_size=8, max_length=320, eval_fraction=0.1, logging_steps=20,
                             seed=seed,
                             add_marker_tokens=add))
    train_s = time.perf_counter() - start
    gen = SteerGenerator.load(policy, device="cpu")
    results = []
    for temperature in (0.0, 0.7):
        requests = [GenerationRequest([{"role": "system", "content": p["system"]}, {"role": "user", "content": p["user"]}],
                                      max_new_tokens=160, temperature=temperature, seed=i)
                    for i, p in enumerate(prompts)]
        results += gen.generate_batch(requests)
    stopped = sum(r.finish_reason == "stop" for r in results)
    leaked = sum(bool(LEAK.search(r.text)) for r in results)
    return {"markers": "added" if add else "split", "train_seconds": round(train_s, 1),
            "eval_loss_after": round(metrics.get("eval_loss_after", float("nan")), 4), "replies": len(results),
            "stop_share": round(stopped / len(results), 3), "leak_share": round(leaked / len(results), 3),
            "example": results[0].text[:120]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="../shared/models/stories260K")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/reply-end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and the CPU is shared
    from steer.demo_data import prompts_path

    prompts = [json.loads(line) for line in open(prompts_path(), encoding="utf-8")][: args.prompts]
    out = Path(args.out)
    rows = [run(args.base, out, add, args.steps, prompts, args.seed) for add in (False, True)]
    print(json.dumps(rows, indent=2))
    print(f"\n{'markers':<8} {'stop':>6} {'leak':>6} {'eval loss':>10} {'train s':>8}")
    for r in rows:
        print(f"{r['markers']:<8} {r['stop_share']:>6.2f} {r['leak_share']:>6.2f} {r['eval_loss_after']:>10.4f} "
              f"{r['train_seconds']:>8.1f}")


if __name__ == "__main__":
    main()
