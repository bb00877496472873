"""Relabeling throughput: length-sorted batches vs one example at a time, same APM, same data, same run.

    python bench/relabel_throughput.py --apm DIR [--data ../shared/data/oasst1-en/messages.jsonl --format oasst]
        [--items 256] [--batch-size 64]

Prints a JSON object, then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apm", required=True, help="APM directory")
    parser.add_argument("--data", default="../shared/data/oasst1-en/messages.jsonl")
    parser.add_argument("--format", default="oasst")
    parser.add_argument("--items", type=int, default=256, help="assistant turns to score")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from steer.models.apm import AttributePredictor
    from steer.data import load_conversations

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = AttributePredictor.load(args.apm, device="cpu")
    conversations, _ = load_conversations(args.data, args.format, schema=predictor.schema)
    items, seen = [], set()
    for conv in conversations:
        for i in conv.assistant_indices():
            key = conv.messages[i].id or f"{conv.id}:{i}"
            if key not in seen:
                seen.add(key)
                items.append(conv.messages[: i + 1])
    items = items[: args.items]

    predictor.predict(items[:8], batch_size=8)  # warm-up: first-call allocations, thread pools

    t0 = time.perf_counter()
    batched = predictor.predict(items, batch_size=args.batch_size, sort_by_length=True)
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    single = [predictor.predict([item], batch_size=1)[0] for item in items]
    t_single = time.perf_counter() - t0

    import numpy as np

    max_diff = float(np.abs(np.asarray(single) - batched).max())
    result = {
        "items": len(items),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "batched_items_per_s": round(len(items) / t_batched, 1),
        "one_at_a_time_items_per_s": round(len(items) / t_single, 1),
        "speedup": round(t_single / t_batched, 2),
        "max_abs_prediction_diff": max_diff,
    }
    print(json.dumps(result))
    print(f"{'mode':<16}{'items/s':>10}")
    print(f"{'batched+sorted':<16}{result['batched_items_per_s']:>10}")
    print(f"{'one at a time':<16}{result['one_at_a_time_items_per_s']:>10}")
    print(f"speedup: {result['speedup']}x  (max |batched - single| = {max_diff:.2e})")


if __name__ == "__main__":
    main()
