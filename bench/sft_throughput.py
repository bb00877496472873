"""SFT throughput and padding waste: tokens/s and the share of real (non-padding) tokens per batch.

    python bench/sft_throughput.py [--base PATH] [--conversations 400] [--steps 8] [--batch-size 16]

Compares length-grouped batching (steer's default) with random batching on the bundled demo
data. The real-token ratio is measured over every batch of one epoch of the Trainer's own
training dataloader; tokens/s counts real tokens over timed optimizer steps. Prints JSON, then
a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def default_base() -> Path | None:
    shared = Path(os.environ.get("STEER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    path = shared / "models" / "stories260K"
    return path if path.exists() else None


def measure(base: str, data: str, n: int, steps: int, batch_size: int, grouped: bool) -> dict:
    import torch
    from transformers import Trainer

    from steer.models.modeling import load_tokenizer
    from steer.training.sft import (
        SftCollator,
        SftConfig,
        SftDataset,
        build_template,
        load_model_for_training,
        tokenize_conversations,
        training_arguments,
    )

    with tempfile.TemporaryDirectory() as out:
        config = SftConfig(base_model=base, data=data, output_dir=out, limit=n, per_device_train_batch_size=batch_size,
                           max_steps=steps, train_sampling_strategy="group_by_length" if grouped else "random",
                           max_length=512, save_steps=10**6,
                           logging_steps=10**6)
        from steer.training.sft import load_sft_conversations

        convs, schema = load_sft_conversations(config)
        tok = load_tokenizer(base)
        tok.padding_side = "right"
        dataset = SftDataset(tokenize_conversations(convs, build_template(config, schema, tok), tok, 512))
        model = load_model_for_training(config)
        args = training_arguments(config, Path(out), has_eval=False)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=SftCollator(tok.pad_token_id),
                          processing_class=tok)
        real = total = 0
        for batch in trainer.get_train_dataloader():
            real += int(batch["attention_mask"].sum())
            total += batch["attention_mask"].numel()
        # Real tokens in the batches the timed steps will see (same sampler seed as train()).
        timed_real = 0
        for i, batch in enumerate(trainer.get_train_dataloader()):
            if i >= steps:
                break
            timed_real += int(batch["attention_mask"].sum())
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {
        "batching": "length-grouped" if grouped else "random",
        "examples": len(dataset),
        "real_token_ratio": round(real / total, 4),
        "steps": steps,
        "seconds": round(seconds, 2),
        "real_tokens_per_s": round(timed_real / seconds, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    from steer.demo_data import rated_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="Base model (default: ../shared/models/stories260K)")
    parser.add_argument("--data", default=str(rated_path()))
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    base = args.base or default_base()
    if base is None:
        sys.exit("no --base given and ../shared/models/stories260K is absent")
    rows = [measure(str(base), args.data, args.conversations, args.steps, args.batch_size, grouped)
            for grouped in (True, False)]
    print(json.dumps({"base": str(base), "batch_size": args.batch_size, "results": rows}, indent=2))
    print(f"\n{'batching':<16} {'real-token ratio':>16} {'real tokens/s':>14}")
    for r in rows:
        print(f"{r['batching']:<16} {r['real_token_ratio']:>16.3f} {r['real_tokens_per_s']:>14.1f}")


if __name__ == "__main__":
    main()
