"""``steer demo --base-model``: the demo pipeline on a real pretrained chat model.

Instead of building and pretraining a tiny model, the given base (hub id, directory or ``.gguf``
file) is fine-tuned with LoRA on the same APM-labelled NPC dialogue. Its steering is then compared
with what a user would otherwise do, asking the unmodified base for the values in its system
message, under the demo APM and, when one is given or trained, an independent judge (an APM on
OpenAssistant's human ratings that never saw the demo data). The general ability the fine-tune
keeps is measured as held-out loss on OpenAssistant replies before and after.

Stages (markers in ``WORKDIR/stages``; a rerun skips finished ones): ``apm`` and ``relabel`` as in
the default demo, ``judge`` (train or adopt the independent APM), ``sft``, ``evaluate``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GENERAL_QUESTIONS = (
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
    "Explain in one sentence what a rainbow is.",
)


def stage_judge(config, work: Path) -> str | None:
    """The independent judge's directory: ``--judge-apm`` as given, or an APM trained here on
    ``--judge-data`` (OpenAssistant ratings by default format)."""
    if config.judge_apm:
        return config.judge_apm
    if not config.judge_data:
        return None
    from steer.training.apm import ApmTrainConfig
    from steer.training.apm import main as train_apm

    out = work / "judge_apm"
    train_apm(ApmTrainConfig(data=config.judge_data, format=config.judge_format, output_dir=str(out), device="cpu"))
    return str(out)


def judge_dir(config, work: Path) -> str | None:
    if config.judge_apm:
        return config.judge_apm
    return str(work / "judge_apm") if config.judge_data else None


def stage_sft(config, work: Path) -> None:
    from steer.training.sft import SftConfig
    from steer.training.sft import main as sft

    from steer.training.demo.pipeline import load_jsonl
    from steer.demo_data import rated_path
    from steer.models.modeling import load_tokenizer

    # SteerLM trains on human-rated data with its human labels plus the APM-relabeled data.
    data = work / "sft_data.jsonl"
    rated = "".join(json.dumps(r) + "\n" for r in load_jsonl(rated_path(), config.apm_limit))
    data.write_text(rated + (work / "relabeled.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    # A chat model keeps its own turn format (the labels go where --label-placement says).
    template = "chat_template" if getattr(load_tokenizer(config.base_model), "chat_template", None) else "steerlm"
    sft(SftConfig(
        base_model=config.base_model, data=str(data), output_dir=str(work / "policy"), format="steer",
        schema=str(work / "apm"), template=template, label_placement=config.label_placement,
        label_wording=config.label_wording or "numbers", lora_r=config.lora_r,
        lora_alpha=2 * config.lora_r, lora_dropout=0.05, max_steps=config.sft_steps,
        per_device_train_batch_size=config.sft_batch_size, learning_rate=config.sft_lr, max_length=config.sft_max_length,
        eval_fraction=0.02, save_steps=40, resume=True, logging_steps=10, limit=config.limit,
        label_contrast=config.sft_label_contrast, label_contrast_mirror=config.sft_label_contrast_mirror or "all",
    ))


def heldout_replies(path: str | None, n: int) -> list[list[dict[str, str]]]:
    """Up to ``n`` OpenAssistant prompt/reply pairs (first assistant reply of each tree)."""
    if not path:
        return []
    from steer.data import load_conversations

    convs, _ = load_conversations(path, "oasst")
    # The last trees of the file: the judge APM trains on all of them, but the SFT never sees any.
    convs = sorted(convs, key=lambda c: c.group, reverse=True)
    pairs, seen = [], set()
    for conv in convs:
        msgs = conv.messages
        if len(msgs) >= 2 and msgs[0].role == "user" and msgs[1].role == "assistant" and conv.group not in seen:
            seen.add(conv.group)
            pairs.append([{"role": "user", "content": msgs[0].content},
                          {"role": "assistant", "content": msgs[1].content}])
        if len(pairs) >= n:
            break
    return pairs


@torch.inference_mode()
def reply_loss(model, tokenizer, template, pairs, max_length: int = 512) -> float | None:
    """Mean per-token loss of the assistant replies, each rendered by ``template`` (the policy's,
    conditioned on the schema defaults) or, for ``template=None``, by the base's own chat template."""
    total, count = 0.0, 0
    for msgs in pairs:
        if template is None:
            prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
            p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            ids = tokenizer(full, add_special_tokens=False).input_ids
            labels = [-100] * len(p_ids) + ids[len(p_ids):]
        else:
            tp = template.tokenize(msgs, tokenizer, mode="train")
            ids, labels = tp.input_ids, tp.labels
        ids, labels = ids[:max_length], labels[:max_length]
        x = torch.tensor([ids], device=model.device)
        y = torch.tensor([labels], device=model.device)
        logits = model(x).logits[:, :-1].float()
        target = y[:, 1:]
        n = int((target != -100).sum())
        if n:
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += n
    return round(total / count, 4) if count else None


def general_ability(config, work: Path) -> dict[str, Any]:
    """Held-out OpenAssistant reply loss and a few answers to general questions, base vs policy."""
    from steer.runtime.generator import GenerationRequest, SteerGenerator
    from steer.models.modeling import load_causal_lm, load_tokenizer
    from steer.models.policy import load_policy

    pairs = heldout_replies(config.judge_data, config.heldout_replies)
    base_tok = load_tokenizer(config.base_model)
    base = load_causal_lm(config.base_model, device="cpu").eval()
    policy = load_policy(work / "policy", device="cpu")
    before = reply_loss(base, base_tok, None, pairs) if pairs and base_tok.chat_template else None
    after = reply_loss(policy.model, policy.tokenizer, policy.template, pairs) if pairs else None
    answers = []
    generator = SteerGenerator(policy.model, policy.tokenizer, policy.schema, policy.template, policy.device)
    for q in GENERAL_QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        enc = base_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True) \
            if base_tok.chat_template else base_tok(q, return_tensors="pt")
        out = base.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=base_tok.pad_token_id)
        base_text = base_tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        reply = generator.generate_batch([GenerationRequest(msgs, {}, 48, 0.0, 1.0, seed=0)])[0]
        answers.append({"question": q, "base": base_text, "policy": reply.text})
    return {"oasst_reply_loss": {"base": before, "policy": after, "n_replies": len(pairs)}, "general_answers": answers}


def evaluate(config, work: Path) -> dict[str, Any]:
    from steer.training.demo.pipeline import load_jsonl
    from steer.demo_data import prompts_path
    from steer.training.steerability import SteerabilityConfig, run

    prompts = work / "eval_prompts.jsonl"
    rows = load_jsonl(prompts_path(), config.eval_prompts)
    prompts.write_text("".join(json.dumps({"id": r["id"], "system": r.get("system"), "prompt": r["user"]}) + "\n"
                               for r in rows), encoding="utf-8")
    judges = [str(work / "apm")] + ([j] if (j := judge_dir(config, work)) else [])
    eval_report = run(SteerabilityConfig(
        policy=str(work / "policy"), apm=judges, output=str(work / "eval"), prompts=str(prompts),
        attributes="helpfulness,humor,creativity", samples=1, best_of=config.best_of,
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, baseline="prompt",
        # 48 rows decode 1.5-1.7x faster than 16 on 2 CPU cores (SmolLM2 policy, 96 replies), which
        # is most of the difference between this stage fitting the demo's budget or not.
        base_model=config.base_model, batch_size=48, device="cpu",
    ))
    (work / "eval" / "report.json").write_text(json.dumps(eval_report, indent=2) + "\n", encoding="utf-8")
    comparison = compare(eval_report)
    metrics_file = work / "policy" / "sft_metrics.json"
    sft = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    return {"mode": "base_model", "base_model": config.base_model, "steerability": eval_report["steerability"],
            "baseline": eval_report.get("baseline"), "comparison": comparison,
            "sft_label_gain": {"before": sft.get("eval_label_gain_before"), "after": sft.get("eval_label_gain_after")},
            "eval_report": str(work / "eval" / "report.json"), **general_ability(config, work)}


def compare(eval_report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per judge, attribute and policy setting: Spearman of the policy at each best-of
    size beside prompt steering of the unmodified base."""
    rows = []
    for i, judge in enumerate(eval_report["judges"]):
        base = judge.get("baseline", {}).get("steerability", {})
        for attr, fig in judge["steerability"].items():
            row = {"judge": "demo APM" if i == 0 else "independent APM", "apm": judge["apm"], "attribute": attr,
                   "prompt_baseline": base.get(attr, {}).get("spearman")}
            for n, block in judge["best_of"].items():
                row[f"policy_best_of_{n}"] = block["steerability"][attr]["spearman"]
                if attr in block.get("vs_baseline", {}):
                    row[f"minus_baseline_best_of_{n}"] = block["vs_baseline"][attr]
            rows.append(row)
    return rows


def format_comparison(report: dict[str, Any]) -> str:
    rows = report["comparison"]
    if not rows:
        return ""
    sizes = [k for k in rows[0] if k.startswith("policy_best_of_")]
    # The paired interval of the smallest best-of's lead over the baseline says whether it is noise.
    gap_key = "minus_baseline_best_of_" + sizes[0].rsplit("_", 1)[1] if sizes else ""
    head = f"{'judge':<16} {'attribute':<12} {'prompt baseline':>15} " + " ".join(
        f"{'best-of-' + k.rsplit('_', 1)[1]:>10}" for k in sizes)
    if any(gap_key in r for r in rows):
        head += f"  best-of-{gap_key.rsplit('_', 1)[1]} minus baseline (95%)"
    lines = ["\nSteerability (Spearman): SteerLM policy vs prompt steering of the unmodified base", head]
    lines[0] += f" ({report['base_model']})"

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    for r in rows:
        gap = r.get(gap_key) or {}
        ci = gap.get("ci95")
        lines.append(f"{r['judge']:<16} {r['attribute']:<12} {fmt(r['prompt_baseline']):>15} "
                     + " ".join(f"{fmt(r[k]):>10}" for k in sizes)
                     + (f"  {gap['difference']:+.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if gap.get("difference") is not None
                        and ci else ""))
    from steer.training.demo.pipeline import format_timings

    lines.append(format_timings(report))
    gain = report.get("sft_label_gain") or {}
    if gain.get("after") is not None:
        lines.append(f"\nSFT label gain (held-out replies' loss under mirrored labels minus their own, nats per "
                     f"token; about 0 = the labels are ignored): before {fmt(gain['before'])}, after {fmt(gain['after'])}")
    loss = report.get("oasst_reply_loss", {})
    if loss.get("n_replies"):
        lines.append(f"\nOpenAssistant reply loss ({loss['n_replies']} held-out replies): "
                     f"base {loss['base']}, policy {loss['policy']}")
    for a in report.get("general_answers", []):
        lines.append(f"\nQ: {a['question']}\n  base:   {a['base']}\n  policy: {a['policy']}")
    return "\n".join(lines)
