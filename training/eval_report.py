"""Readable summaries of a steerability report: ``report.md`` and the table the command prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _means(block: dict) -> str:
    return " ".join(_f(lv["mean"]) for lv in block["levels"])


def _ci(interval) -> str:
    return "n/a" if not interval else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _gap(gap: dict | None) -> str:
    """``+0.63 [0.40, 0.83]``: the policy's Spearman minus the baseline's, with its interval."""
    if not gap or gap.get("difference") is None:
        return ""
    return f"{gap['difference']:+.2f} {_ci(gap.get('ci95'))}"


def steerability_rows(judge: dict[str, Any]) -> list[list[str]]:
    """One row per (attribute, best-of N or baseline)."""
    rows = []
    for name in judge["steerability"]:
        for n, block in judge["best_of"].items():
            s = block["steerability"].get(name)
            if s:
                rows.append([name, f"policy best-of-{n}", _f(s["spearman"]), _ci(s.get("spearman_ci95")),
                             _f(s["pearson"]), _means(s), "yes" if s["monotonic"] else "no", _f(s["within_1"]),
                             _gap(block.get("vs_baseline", {}).get(name))])
        base = (judge.get("baseline") or {}).get("steerability", {}).get(name)
        if base:
            rows.append([name, "prompt baseline", _f(base["spearman"]), _ci(base.get("spearman_ci95")),
                         _f(base["pearson"]), _means(base), "yes" if base["monotonic"] else "no",
                         _f(base["within_1"]), ""])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


HEADER = ["attribute", "generation", "Spearman", "95%", "Pearson", "mean measured per level", "monotonic", "within 1",
          "Spearman minus baseline (95%)"]


def write_markdown(report: dict[str, Any], path: Path) -> None:
    s = report["settings"]
    lines = ["# Steerability report", "",
             f"Policy `{s['policy']}`; {s['n_prompts']} prompts ({s['prompts']}), {s['samples']} draws per prompt and "
             f"level, values {s['values'] or 'full range'}, other attributes at their defaults {s['defaults']}; "
             f"temperature {s['temperature']}, top-p {s['top_p']}, at most {s['max_new_tokens']} tokens, seed {s['seed']}. "
             f"Best-of winners picked by the first judge ({s['selection']}).", ""]
    if s.get("base_model"):
        lines += [f"Prompt baseline: `{s['base_model']}` with no adapter, values written as instructions in the "
                  f"system message ({s.get('baseline_prompt')}).", ""]
    for j, judge in enumerate(report["judges"]):
        role = "primary judge" if j == 0 else f"judge {j + 1}"
        lines += [f"## {role}: `{judge['apm']}`", "",
                  "Intervals are 95% bootstraps over prompts (the difference from the baseline resamples both on "
                  "the same prompts); those per level are in report.json.", ""]
        lines += _table(HEADER, steerability_rows(judge)) + [""]
        ct = judge["crosstalk"]
        cols = list(next(iter(ct.values()), {}))
        largest = list(judge["best_of"])[-1]
        lines += [f"Cross-talk at best-of-{largest} (Spearman of the varied attribute's request against each measured "
                  "attribute; ideal: the diagonal high, the rest near 0):", ""]
        lines += _table(["varied \\ measured", *cols], [[a, *[_f(row.get(c)) for c in cols]] for a, row in ct.items()])
        lines.append("")
    lines += ["## Relevance", "",
              "Cosine similarity (all-MiniLM-L6-v2) between the player line and the reply, mean per requested level:",
              ""]
    rel_rows = []
    for n, block in report["best_of"].items():
        for a, r in block["relevance"].items():
            rel_rows.append([a, f"policy best-of-{n}", _means(r), _f(r["mean"])])
    for a, r in ((report.get("baseline") or {}).get("relevance") or {}).items():
        rel_rows.append([a, "prompt baseline", _means(r), _f(r["mean"])])
    lines += _table(["attribute", "generation", "per level", "mean"], rel_rows) + [""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    if report.get("examples"):
        lines += ["## Examples (largest best-of)", ""]
        for e in report["examples"]:
            lines.append(f"- **{e['attribute']} {e['requested']}** (measured {_f(e['measured'])}), player: "
                         f"\"{e['player']}\"  \n  policy: {e['reply']!r}"
                         + (f"  \n  baseline: {e['baseline_reply']!r}" if "baseline_reply" in e else ""))
        lines.append("")
    t = report.get("timings", {})
    lines.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def format_summary(report: dict[str, Any]) -> str:
    rows = steerability_rows(report["judges"][0])
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    out = [f"Steerability under the primary judge ({report['judges'][0]['apm']})", fmt(HEADER)]
    out += [fmt(r) for r in rows]
    for j, judge in enumerate(report["judges"][1:], start=2):
        largest = list(judge["best_of"])[-1]
        out.append(f"judge {j} ({judge['apm']}), best-of-{largest}: " + ", ".join(
            f"{a} {_f(s['spearman'])}" for a, s in judge["steerability"].items()))
    return "\n".join(out)
