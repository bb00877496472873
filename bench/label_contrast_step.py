"""Label-contrast SFT step: mirrored copies run in full vs from their own rows' KV cache.

    python bench/label_contrast_step.py [--base ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf]
                                        [--batches 4] [--rounds 2]

``steer sft --label-contrast`` scores every labelled reply a second time under mirrored labels. A
copy and its own row agree up to the first label token, so the trainer runs the copies from that
point on, over the own rows' KV cache (``steer.training.label_contrast.copy_tails``). This times one
optimizer step (forward, backward, AdamW) both ways on the same batches, alternating the two within
each round, with the settings of ``steer demo --base-model`` (the bundled rated NPC dialogue, chat
template, labels as words opening the reply, 192 tokens, batches of 8, LoRA r 16 on all linear
layers) and checks that both give the same loss. Prints JSON, then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def default_base() -> str:
    shared = Path(os.environ.get("STEER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return str(shared / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model (default: SmolLM2-135M-Instruct GGUF in ../shared)")
    parser.add_argument("--batches", type=int, default=4, help="batches timed per round and mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import TrainingArguments

    from steer.demo_data import rated_path
    from steer.models.modeling import load_tokenizer
    from steer.training.demo.pipeline import demo_schema
    from steer.training.label_contrast import LabelContrastTrainer, copy_tails
    from steer.training.sft import (
        ContrastPicker,
        SftCollator,
        SftConfig,
        SftDataset,
        build_template,
        load_model_for_training,
        load_sft_conversations,
        tokenize_conversations,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base or default_base()
    with tempfile.TemporaryDirectory() as out:
        schema_file = Path(out) / "schema.json"
        demo_schema().save(schema_file)
        config = SftConfig(base_model=base, data=str(rated_path()), output_dir=out, format="steer",
                           schema=str(schema_file), template="chat_template", label_placement="reply",
                           label_wording="words", max_length=args.max_length, lora_r=16, lora_alpha=32,
                           lora_dropout=0.0, label_contrast=3.0)
        convs, schema = load_sft_conversations(config)
        tok = load_tokenizer(base)
        tok.padding_side = "right"
        template = build_template(config, schema, tok)
        dataset = SftDataset(tokenize_conversations(convs, template, tok, args.max_length,
                                                    contrast=ContrastPicker(schema, "all")))
        # Batches of similar length, as the Trainer's length-grouped sampler makes them, spread over
        # the length range.
        order = np.argsort(dataset.lengths)
        starts = np.linspace(0, len(order) - args.batch_size, args.batches).astype(int)
        collate = SftCollator(tok.pad_token_id)
        batches = [collate([dataset[int(i)] for i in order[s:s + args.batch_size]]) for s in starts]
        model = load_model_for_training(config)
        model.train()
        trainer = LabelContrastTrainer(
            model=model, args=TrainingArguments(output_dir=out, report_to="none", use_cpu=True),
            label_contrast=3.0, label_contrast_margin=0.3)
        shares = trainer.shares_prefix
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: every step sees the same weights

        seconds = {"full copies": [], "shared prefix": []}
        losses = {mode: [] for mode in seconds}
        for _ in range(args.rounds):
            for mode in seconds:
                trainer.shares_prefix = mode == "shared prefix" and shares
                total = 0.0
                for batch in batches:
                    start = time.perf_counter()
                    loss = trainer.compute_loss(model, dict(batch))
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    total += time.perf_counter() - start
                    losses[mode].append(float(loss.detach()))
                seconds[mode].append(total / len(batches))

        own_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        copy_tokens = sum(int(b["contrast_attention_mask"].sum()) for b in batches)
        reused = sum(int(copy_tails(b["input_ids"], b["attention_mask"], b["contrast_input_ids"],
                                    b["contrast_attention_mask"], b["contrast_labels"], b["contrast_rows"]).start.sum())
                     for b in batches)
    report = {
        "base": base, "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "widths": [int(b["input_ids"].shape[1]) for b in batches],
        "own_tokens": own_tokens, "copy_tokens": copy_tokens, "copy_tokens_from_cache": reused,
        "cache_usable": shares,
        "same_loss": bool(np.allclose(losses["full copies"], losses["shared prefix"], rtol=1e-4, atol=1e-4)),
        "modes": {m: {"step_seconds_median": round(statistics.median(s), 3), "step_seconds": [round(x, 3) for x in s]}
                  for m, s in seconds.items()},
    }
    report["speedup"] = round(report["modes"]["full copies"]["step_seconds_median"]
                              / report["modes"]["shared prefix"]["step_seconds_median"], 3)
    print(json.dumps(report, indent=2))
    print(f"\n{'mode':<14} {'s / step':>9}")
    for m, r in report["modes"].items():
        print(f"{m:<14} {r['step_seconds_median']:>9.2f}")
    print(f"speedup {report['speedup']}x; {reused} of {copy_tokens} copy tokens read from the cache "
          f"({100 * reused / max(copy_tokens, 1):.0f}%); same loss: {report['same_loss']}")


if __name__ == "__main__":
    main()
