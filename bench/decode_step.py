"""What batching can buy on this machine: one decode step at batch 1 and at batch N, timed.

    python bench/decode_step.py [--policy DIR] [--device cpu] [--batch 16] [--tokens 64]

A server decoding N rows together makes N tokens per step where `generate` makes one, so the
speedup of serving over one-at-a-time generation cannot exceed N x t(1) / t(N), where t(B) is one
decode step at batch B. On a GPU, t(N) stays close to t(1) for small models; on a CPU the batch's
matrix products and attention over its KV cache are real work, and t(N) grows. This prints that
bound ("batching_ceiling", the forward alone; "ceiling_with_sampling" adds drawing each row's
token), next to the cost of a step that also prefills one joining request (the engine's mixed step),
fed whole or only past the start it shares with a running row (copied from that row's cache).

Each timing is the median over a real decode of --tokens steps (the KV cache grows as it would),
after a warm-up, batch 1 and batch N decoded in turns of 8 steps so that both see the same machine
speed; CUDA is synchronised around every step. Uses the serving benchmark's prompts and
sampling settings. Without --policy, ../shared/models/stories260K is wrapped as a policy. Prints a
JSON object, then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import _gen_kwargs, requests_for, wrap_stories260k  # noqa: E402

from steer.runtime.rows import MIN_COPIED_TOKENS, common_prefix_length  # noqa: E402


def time_decode(generator, batches: list[list], tokens: int, sync, block: int = 8) -> list[dict[str, float]]:
    """Median milliseconds of a decode step and of sampling for each batch of ``batches``, each
    decoded as one batch, in turns of ``block`` steps (8 steps of batch 1, 8 of batch 16, ...).

    This VM's speed changes by a third in plateaus of a few seconds; timed one after the other,
    batch 1 and batch 16 could each land on a different plateau, and their ratio (the ceiling)
    swung from 7x to 15x between the rounds of one run. In turns, both see the same machine. Each
    turn's first step is left out of the medians: it runs with the other batch's data in the CPU's
    caches, where one-at-a-time generation and the server each run their own steps back to back."""
    from steer.runtime.model_runner import decode_step, left_pad, prefill
    from steer.runtime.sampling import sample_next_tokens

    runs = []
    for prepared in batches:
        params, rngs = [p.params for p in prepared], [p.params.make_rng() for p in prepared]
        ids, mask = left_pad([p.prompt_ids for p in prepared], generator.pad_token_id, generator.device)
        logits, state = prefill(generator.model, ids, mask)
        runs.append({"params": params, "rngs": rngs, "logits": logits, "state": state, "steps": [], "draws": []})
    total = tokens + 3  # the first three are warm-up
    for first in range(0, total, block):
        for run in runs:
            for i in range(first, min(first + block, total)):
                sync()
                start = time.perf_counter()
                next_tokens = sample_next_tokens(run["logits"], run["params"], run["rngs"])
                sync()
                drawn = time.perf_counter()
                run["logits"] = decode_step(generator.model, next_tokens, run["state"])
                sync()
                if i >= 3 and i != first:
                    run["draws"].append(drawn - start)
                    run["steps"].append(time.perf_counter() - drawn)
    return [{"step_ms": statistics.median(run["steps"]) * 1e3, "sample_ms": statistics.median(run["draws"]) * 1e3}
            for run in runs]


def time_mixed(generator, prepared, joining, tokens: int, sync, copy: bool = False) -> float:
    """Median milliseconds of a mixed step: the batch's decode step plus one joining prompt. With
    ``copy``, the prompt copies what it shares with a running row's prompt (the template's
    opening) from that row's cache, as the engine does, and is fed only the rest."""
    import torch

    from steer.runtime.model_runner import left_pad, prefill
    from steer.runtime.mixed_step import JoiningPrompt, mixed_step, supports_mixed_step

    ids, mask = left_pad([p.prompt_ids for p in prepared], generator.pad_token_id, generator.device)
    _, state = prefill(generator.model, ids, mask)
    if not supports_mixed_step(generator.model, state):
        return float("nan")
    pending = torch.zeros(len(prepared), dtype=torch.long, device=generator.device)
    prompt = joining.prompt_ids
    # The prompt joins in row 0 every step, copying what it shares with row 1's prompt.
    copied = common_prefix_length(prepared[1].prompt_ids, prompt, len(prompt) - 1) if copy else 0
    times = []
    for i in range(tokens + 3):
        sync()
        start = time.perf_counter()
        mixed_step(generator.model, pending, state, [JoiningPrompt(0, prompt, 1, copied)])
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_prefill(generator, prepared, sync) -> float:
    """Median milliseconds of prefilling one prompt alone (batch 1) and sampling its first token,
    as one-at-a-time generation does before its first decode step; over the prompts of ``prepared``."""
    from steer.runtime.model_runner import left_pad, prefill
    from steer.runtime.sampling import sample_next_tokens

    times = []
    for i, p in enumerate([prepared[0]] + list(prepared)):  # the first is a warm-up
        ids, mask = left_pad([p.prompt_ids], generator.pad_token_id, generator.device)
        sync()
        start = time.perf_counter()
        logits, _ = prefill(generator.model, ids, mask)
        sample_next_tokens(logits, [p.params], [p.params.make_rng()])
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_joining(generator, running, joining, sync, repeats: int = 8) -> float:
    """Median milliseconds that one prompt of ``joining`` adds to a decode step of the batch
    ``running`` when all of ``joining`` join it in one mixed step, each copying the start it shares
    with a running row's prompt from that row's cache (as the engine admits requests that arrive
    together): (mixed step - plain step) / len(joining), the two timed back to back ``repeats``
    times. NaN when the model cannot take mixed steps or no running row is left to copy from."""
    import torch

    from steer.runtime.mixed_step import JoiningPrompt, fits, mixed_step, supports_mixed_step
    from steer.runtime.model_runner import decode_step, left_pad, prefill

    k = len(joining)
    if not 0 < k < len(running):
        return float("nan")
    ids, mask = left_pad([p.prompt_ids for p in running], generator.pad_token_id, generator.device)
    _, state = prefill(generator.model, ids, mask)
    if not supports_mixed_step(generator.model, state):
        return float("nan")
    pending = torch.zeros(len(running), dtype=torch.long, device=generator.device)
    for _ in range(3):  # warm-up; the batch's cache also grows past the joining prompts' lengths
        decode_step(generator.model, pending, state)
    if not all(fits(state, len(p.prompt_ids)) for p in joining):
        return float("nan")
    # Row i < k takes joining prompt i, copying from the running row (k or later) it shares most with.
    prompts = []
    for row, p in enumerate(joining):
        shared = [(common_prefix_length(running[s].prompt_ids, p.prompt_ids, len(p.prompt_ids) - 1), s)
                  for s in range(k, len(running))]
        copied, source = max(shared)
        prompts.append(JoiningPrompt(row, p.prompt_ids, source, copied) if copied >= MIN_COPIED_TOKENS
                       else JoiningPrompt(row, p.prompt_ids))
    extra = []
    for _ in range(repeats + 1):  # the first pair is a warm-up
        sync()
        start = time.perf_counter()
        decode_step(generator.model, pending, state)
        sync()
        middle = time.perf_counter()
        mixed_step(generator.model, pending, state, prompts)
        sync()
        extra.append((time.perf_counter() - middle) - (middle - start))
    return statistics.median(extra[1:]) * 1e3 / k


def ceiling_with_prefill(one: dict, many: dict, n: int, prefill_ms: float, joining_ms: float,
                         tokens: float) -> float:
    """The batching ceiling for requests that must each be prefilled: one request of ``tokens``
    tokens costs a prefill at batch 1 and ``tokens`` steps at batch 1 one at a time; batched, it
    costs its share of ``tokens`` steps at batch ``n`` and what its prompt adds to the step it joins.
    Sampling included on both sides, as in ``ceiling_with_sampling``."""
    alone = prefill_ms + tokens * (one["step_ms"] + one["sample_ms"])
    batched = tokens * (many["step_ms"] + many["sample_ms"]) / n + joining_ms
    return alone / batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=None, help="policy directory (default: stories260K wrapped in a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: the policy's)")
    parser.add_argument("--batch", type=int, default=16, help="the batched side's rows (the serving bench's clients)")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default; the serving bench uses 1)")
    args = parser.parse_args()

    import torch

    from steer.runtime.generator import GenerationRequest, SteerGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tmp = tempfile.mkdtemp(prefix="steer-bench-")
    try:
        policy = args.policy or str(wrap_stories260k(Path(tmp) / "policy"))
        generator = SteerGenerator.load(policy, device=args.device, dtype=args.dtype)
        # The batch, then the requests that would come next (half a batch of them join at once).
        bodies = requests_for(args.batch + args.batch // 2, args.tokens)
        following, bodies = bodies[args.batch:], bodies[:args.batch]
        # The joining request is none of the batch's: it shares only the template's opening with them.
        bodies.append({**bodies[0], "messages": [{"role": "user", "content": "Name three birds that cannot fly."}],
                       "attributes": {"humor": 2, "creativity": 3}})
        prepared = [generator.prepare(GenerationRequest(**_gen_kwargs(b))) for b in bodies]
        one, many = time_decode(generator, [prepared[:1], prepared[: args.batch]], args.tokens, sync)
        mixed_ms = time_mixed(generator, prepared[: args.batch], prepared[-1], args.tokens, sync)
        copied_ms = time_mixed(generator, prepared[: args.batch], prepared[-1], args.tokens, sync, copy=True)
        shared = common_prefix_length(prepared[1].prompt_ids, prepared[-1].prompt_ids)
        prefill_ms = time_prefill(generator, prepared[: args.batch], sync)
        joining_ms = time_joining(generator, prepared[: args.batch],
                                  [generator.prepare(GenerationRequest(**_gen_kwargs(b))) for b in following], sync)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.batch
    report = {
        "policy": args.policy or "stories260K (wrapped)",
        "device": args.device,
        "dtype": str(next(generator.model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "batch": n,
        "decode_step_ms": {"1": round(one["step_ms"], 3), str(n): round(many["step_ms"], 3)},
        "sample_ms": {"1": round(one["sample_ms"], 3), str(n): round(many["sample_ms"], 3)},
        "mixed_step_ms": round(mixed_ms, 3),
        # The same, with the joining prompt's opening copied from a running row's cache.
        "mixed_step_copied_ms": round(copied_ms, 3),
        "joining_prompt_tokens": len(prepared[-1].prompt_ids),
        "joining_prompt_shared_tokens": shared,
        "forward_tokens_per_s": {"1": round(1e3 / one["step_ms"], 1), str(n): round(n * 1e3 / many["step_ms"], 1)},
        # The most any batching scheduler could gain over one-at-a-time decoding, forward passes only.
        "batching_ceiling": round(n * one["step_ms"] / many["step_ms"], 2),
        "ceiling_with_sampling": round(n * (one["step_ms"] + one["sample_ms"])
                                       / (many["step_ms"] + many["sample_ms"]), 2),
        # Every request is also prefilled: alone at batch 1 one at a time (prompt, first token), or
        # joining a running batch's step with half a batch of others (its share of that step's extra
        # cost). The ceiling above leaves prefills out; this one counts them for replies of --tokens.
        "prefill_ms": round(prefill_ms, 3),
        "joining_ms_per_prompt": round(joining_ms, 3),
        "ceiling_with_prefill": round(ceiling_with_prefill(one, many, n, prefill_ms, joining_ms, args.tokens), 2),
    }
    print(json.dumps(report, indent=2))
    print()
    print(f"{'':<26}{'batch 1':>10}{'batch ' + str(n):>10}")
    print(f"{'decode step (ms)':<26}{one['step_ms']:>10.3f}{many['step_ms']:>10.3f}")
    print(f"{'sampling (ms)':<26}{one['sample_ms']:>10.3f}{many['sample_ms']:>10.3f}")
    print(f"{'mixed step, 1 joining (ms)':<26}{'':>10}{mixed_ms:>10.3f}")
    print(f"{'  its shared start copied':<26}{'':>10}{copied_ms:>10.3f}  "
          f"({shared} of {len(prepared[-1].prompt_ids)} prompt tokens)")
    print(f"{'forward tokens/s':<26}{1e3 / one['step_ms']:>10.1f}{n * 1e3 / many['step_ms']:>10.1f}")
    print(f"{'prefill alone (ms)':<26}{prefill_ms:>10.3f}")
    print(f"{'joining, per prompt (ms)':<26}{'':>10}{joining_ms:>10.3f}  ({len(following)} joining one step)")
    print(f"batching ceiling: {report['batching_ceiling']:.2f}x (forward), "
          f"{report['ceiling_with_sampling']:.2f}x (with sampling), "
          f"{report['ceiling_with_prefill']:.2f}x (with prefills, {args.tokens}-token replies)")


if __name__ == "__main__":
    main()
