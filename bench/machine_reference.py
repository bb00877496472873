"""How fast is this machine for SmolLM2-135M? The reference figures the demo's time budget was set
with: the step and the generation run in plain transformers and peft (steer only loads the GGUF),
so a demo run on another day or VM can be scaled to the machine the budget was set on.

    python bench/machine_reference.py [--base ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf]

Times: loading the GGUF; one LoRA step (rank 16 on all linear layers, AdamW) over 8 sequences of
128 tokens, four times; greedy ``generate`` of 64 tokens at batch 1 and at batch 16. On the machine
the budget was set on: 21 s, 6.5 s per step, 14 and 96 tokens/s. Prints JSON, then a short table
with the ratio to those figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The figures (2-core VM, 2026-11): GGUF load s, LoRA step s, generate tokens/s at batch 1 and 16.
REFERENCE = {"load_s": 21.0, "lora_step_s": 6.5, "generate_tok_s_batch_1": 14.0, "generate_tok_s_batch_16": 96.0}


def main() -> None:
    shared = Path(os.environ.get("STEER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(shared / "models" / "smollm2-135m-instruct"
                                              / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from steer.models.modeling import load_causal_lm, load_tokenizer

    start = time.perf_counter()
    model = load_causal_lm(args.base, device="cpu")
    load_s = time.perf_counter() - start
    tok = load_tokenizer(args.base)
    lm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    x = torch.randint(0, min(40000, model.config.vocab_size), (8, 128))
    steps = []
    for _ in range(4):
        start = time.perf_counter()
        lm(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(time.perf_counter() - start)
    model = lm.merge_and_unload().eval()
    messages = [{"role": "user", "content": "Tell me about the weather in spring."}]
    enc = (tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
           if tok.chat_template else tok(messages[0]["content"], return_tensors="pt"))
    rates = {}
    for batch in (1, 16):
        ids, mask = enc["input_ids"].repeat(batch, 1), enc["attention_mask"].repeat(batch, 1)
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        rates[batch] = batch * 64 / (time.perf_counter() - start)
    measured = {"load_s": round(load_s, 1), "lora_step_s": round(statistics.median(steps[1:]), 2),
                "generate_tok_s_batch_1": round(rates[1], 1), "generate_tok_s_batch_16": round(rates[16], 1)}
    # How much slower than the reference machine, per figure (>1: slower).
    slower = {k: round(measured[k] / REFERENCE[k] if k.endswith("_s") else REFERENCE[k] / measured[k], 2)
              for k in measured}
    report = {"base": args.base, "threads": torch.get_num_threads(), "lora_steps_s": [round(s, 2) for s in steps],
              "measured": measured, "reference": REFERENCE, "slower_than_reference": slower}
    print(json.dumps(report, indent=2))
    print(f"\n{'figure':<26} {'here':>8} {'reference':>10} {'slower':>7}")
    for k in measured:
        print(f"{k:<26} {measured[k]:>8} {REFERENCE[k]:>10} {slower[k]:>6}x")


if __name__ == "__main__":
    main()
