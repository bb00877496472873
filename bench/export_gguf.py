"""How faithful `steer export gguf` is, per dtype: teacher-forced next-token argmax agreement between
the policy as steer loads it and the exported file as transformers loads it (``gguf_file=``), on
held-out conversations of the demo data, beside the file size and the export time.

The baseline in the same run is the policy against itself loaded a second time (agreement 1.0 by
construction, checking the harness). Prints JSON and a short table.

    python bench/export_gguf.py --policy /work/exp/demo/policy
    python bench/export_gguf.py --policy DIR --dtypes f32 f16 q8_0 --conversations 1500:1520
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"])
    parser.add_argument("--conversations", default="1500:1520", help="rows START:END of the demo's rated.jsonl")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest sequence fed in one forward pass")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from steer.demo_data import rated_path
    from steer.cli.export_gguf import ExportGgufConfig, export_policy
    from steer.models.policy import load_policy

    policy = load_policy(args.policy, device="cpu", dtype="float32")
    start, end = (int(x) for x in args.conversations.split(":"))
    rows = Path(rated_path()).read_text(encoding="utf-8").splitlines()[start:end]
    sequences = [policy.template.tokenize(json.loads(r)["messages"], policy.tokenizer, mode="train").input_ids
                 [: args.max_tokens] for r in rows]
    reference = [_logits(policy.model, ids) for ids in sequences]
    again = load_policy(args.policy, device="cpu", dtype="float32")
    baseline = float(np.mean(np.concatenate([_logits(again.model, ids).argmax(-1) == ref.argmax(-1)
                                             for ids, ref in zip(sequences, reference)])))
    results = {"policy": args.policy, "positions": sum(map(len, sequences)), "conversations": args.conversations,
               "baseline_same_policy_reloaded": baseline, "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            path = Path(tmp) / f"policy-{dtype}.gguf"
            began = time.perf_counter()
            export_policy(ExportGgufConfig(policy=args.policy, output=str(path), dtype=dtype))
            seconds = time.perf_counter() - began
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            same, diffs = [], []
            for ids, ref in zip(sequences, reference):
                got = _logits(model, ids)
                same.append(got.argmax(-1) == ref.argmax(-1))
                diffs.append(np.abs(got - ref).max())
            results["exports"][dtype] = {"argmax_agreement": float(np.mean(np.concatenate(same))),
                                         "max_abs_logit_diff": float(max(diffs)),
                                         "size_mib": round(path.stat().st_size / 2**20, 2),
                                         "export_seconds": round(seconds, 1)}
    print(json.dumps(results, indent=2))
    print(f"\n{'dtype':<8} {'agreement':>10} {'max |dlogit|':>13} {'MiB':>8} {'export s':>9}")
    print(f"{'(self)':<8} {baseline:>10.4f}")
    for dtype, r in results["exports"].items():
        print(f"{dtype:<8} {r['argmax_agreement']:>10.4f} {r['max_abs_logit_diff']:>13.5f} {r['size_mib']:>8.2f} "
              f"{r['export_seconds']:>9.1f}")


if __name__ == "__main__":
    main()
