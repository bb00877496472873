"""Steerability metrics: how closely measured attribute values follow the requested ones.

Pure functions over arrays (one entry per reply), so they are tested on hand-made inputs:

- :func:`attribute_metrics`: Spearman and Pearson between requested and measured, the mean measured
  value per requested level with a 95% bootstrap interval (resampling prompts, since replies to
  one prompt are not independent), monotonicity and the share of replies within 1 of the request;
- :func:`crosstalk`: varying attribute A against measured attribute B (Spearman);
- :func:`spearman_difference`: a policy's Spearman minus a baseline's on the same cells, with a
  paired 95% bootstrap interval over prompts: whether one steers better than the other, or the
  difference is inside the noise of a small grid;
- :func:`level_means`: any per-reply quantity (relevance) averaged per level with the same interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

BOOTSTRAP_SAMPLES = 1000


def _corr(fn, x: np.ndarray, y: np.ndarray) -> float | None:
    # Undefined (None) when either side is constant: a policy that ignores the request has no
    # correlation to report, and 0 would pass for "no effect measured" on a constant judge.
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(fn(x, y).statistic)
    return None if np.isnan(value) else round(value, 4)


def spearman(x, y) -> float | None:
    return _corr(spearmanr, np.asarray(x, dtype=float), np.asarray(y, dtype=float))


def pearson(x, y) -> float | None:
    return _corr(pearsonr, np.asarray(x, dtype=float), np.asarray(y, dtype=float))


def level_means(levels: Sequence[int], requested, values, groups, n_boot: int = BOOTSTRAP_SAMPLES,
                seed: int = 0) -> list[dict]:
    """Per requested level: mean of ``values`` with a 95% percentile-bootstrap interval over
    ``groups`` (prompts), and the count. Every bootstrap sample draws prompts with replacement and
    takes, per level, the mean of all replies to the drawn prompts."""
    requested = np.asarray(requested)
    values = np.asarray(values, dtype=float)
    groups = np.asarray(groups)
    uniq, group_idx = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    counts_per_draw = np.stack([np.bincount(d, minlength=len(uniq)) for d in draws]) if n_boot else None
    out = []
    for level in levels:
        sel = requested == level
        n = int(sel.sum())
        if n == 0:
            out.append({"requested": int(level), "mean": None, "ci95": None, "n": 0})
            continue
        sums = np.bincount(group_idx[sel], weights=values[sel], minlength=len(uniq))
        counts = np.bincount(group_idx[sel], minlength=len(uniq)).astype(float)
        mean = float(values[sel].mean())
        ci = None
        if n_boot:
            boot_counts = counts_per_draw @ counts
            ok = boot_counts > 0
            boot = (counts_per_draw @ sums)[ok] / boot_counts[ok]
            lo, hi = np.percentile(boot, [2.5, 97.5])
            ci = [round(float(lo), 4), round(float(hi), 4)]
        out.append({"requested": int(level), "mean": round(mean, 4), "ci95": ci, "n": n})
    return out


def _prompt_draws(groups, n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``n_boot`` bootstrap samples that draw prompts (``groups``) with replacement
    and take every reply to each drawn prompt."""
    groups = np.asarray(groups)
    uniq, group_idx = np.unique(groups, return_inverse=True)
    rows = [np.flatnonzero(group_idx == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    return [np.concatenate([rows[g] for g in draw]) for draw in rng.integers(0, len(uniq), size=(n_boot, len(uniq)))]


def _interval(samples: list[float]) -> list[float] | None:
    samples = [s for s in samples if s is not None]
    if len(samples) < 20:  # too few defined resamples for a 95% interval
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def spearman_interval(requested, measured, groups, n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list | None:
    """95% bootstrap interval of Spearman(requested, measured), resampling prompts."""
    requested, measured = np.asarray(requested, dtype=float), np.asarray(measured, dtype=float)
    return _interval([spearman(requested[i], measured[i]) for i in _prompt_draws(groups, n_boot, seed)])


def spearman_difference(requested, measured, baseline, groups, n_boot: int = BOOTSTRAP_SAMPLES,
                        seed: int = 0) -> dict:
    """Spearman(requested, measured) minus Spearman(requested, baseline), where entry i of
    ``measured`` and of ``baseline`` answer the same cell (prompt, requested value, draw). The 95%
    interval resamples prompts for both at once (paired), so the prompts' shared difficulty cancels."""
    requested = np.asarray(requested, dtype=float)
    measured, baseline = np.asarray(measured, dtype=float), np.asarray(baseline, dtype=float)

    def diff(idx) -> float | None:
        a, b = spearman(requested[idx], measured[idx]), spearman(requested[idx], baseline[idx])
        return None if a is None or b is None else a - b

    point = diff(np.arange(len(requested)))
    return {"difference": None if point is None else round(point, 4),
            "ci95": _interval([diff(i) for i in _prompt_draws(groups, n_boot, seed)]) if n_boot else None}


def attribute_metrics(requested, measured, groups, levels: Sequence[int] | None = None,
                      n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    """Steerability of one attribute under one judge. ``requested``/``measured``/``groups`` have one
    entry per reply; ``groups`` says which prompt it answers (the bootstrap's unit)."""
    requested = np.asarray(requested, dtype=float)
    measured = np.asarray(measured, dtype=float)
    if levels is None:
        levels = sorted({int(v) for v in requested})
    per_level = level_means(levels, requested, measured, groups, n_boot=n_boot, seed=seed)
    means = [lv["mean"] for lv in per_level if lv["mean"] is not None]
    return {
        "spearman": spearman(requested, measured),
        "spearman_ci95": spearman_interval(requested, measured, groups, n_boot, seed) if n_boot else None,
        "pearson": pearson(requested, measured),
        "levels": per_level,
        # Each level's mean strictly above the one below.
        "monotonic": bool(len(means) >= 2 and all(b > a for a, b in zip(means, means[1:]))),
        "within_1": round(float(np.mean(np.abs(measured - requested) <= 1.0)), 4) if len(measured) else None,
        "mean_abs_error": round(float(np.mean(np.abs(measured - requested))), 4) if len(measured) else None,
        "n": int(len(measured)),
    }


def crosstalk(varied: Mapping[str, tuple[np.ndarray, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, float | None]]:
    """``{A: (requested values of A, {B: measured B on the same replies})}`` ->
    ``{A: {B: Spearman}}``. The diagonal is the steerability itself; off the diagonal, an ideal
    policy shows 0 (steering A leaves B alone)."""
    return {a: {b: spearman(req, meas) for b, meas in measured.items()} for a, (req, measured) in varied.items()}
