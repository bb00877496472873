"""Cross-validation for the APM, grouped by conversation: folds, out-of-fold predictions, pooled
correlations with bootstrap intervals, and the baselines every report carries.

With a few hundred rated replies from ~150 conversation trees, one held-out split of 14-16 trees
moves the headline figure from 0.07 to 0.48. So every figure here is pooled over all out-of-fold
predictions (each rated reply is predicted exactly once, by a model that never saw its tree), its
95% interval comes from resampling whole trees, and the spread across folds is reported beside it.
Two baselines always run on the same folds: the training mean (what "no model" scores) and a ridge
probe on frozen mean-pooled embeddings from the same backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from steer.core.attributes import AttributeSchema

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))
# Fewer rated replies than this and a correlation means little; report null instead.
MIN_ITEMS_FOR_CORRELATION = 3


# ------------------------------------------------------------------- folds
def grouped_folds(groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) of every item. A group (conversation tree, prompt) lands wholly in one
    fold; groups are shuffled by ``seed`` and dealt largest first to the fold with fewest items so
    folds stay close in size even when a few trees hold many rated replies."""
    groups = [str(g) for g in groups]
    unique = sorted(set(groups))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(unique) < k:
        raise ValueError(f"{len(unique)} conversation group(s) cannot fill {k} folds; lower the number of folds")
    sizes = {g: 0 for g in unique}
    for g in groups:
        sizes[g] += 1
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]
    order.sort(key=lambda g: -sizes[g])  # stable: ties keep the shuffled order
    load = np.zeros(k, dtype=int)
    fold_of = {}
    for g in order:
        f = int(np.argmin(load))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.array([fold_of[g] for g in groups], dtype=int)


def out_of_fold(folds: np.ndarray, fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
                n_outputs: int) -> np.ndarray:
    """``[N, n_outputs]`` predictions, each row made by ``fit_predict(train_idx, test_idx)`` for the
    one fold that holds it out."""
    out = np.full((len(folds), n_outputs), np.nan)
    for f in np.unique(folds):
        test = np.flatnonzero(folds == f)
        train = np.flatnonzero(folds != f)
        out[test] = fit_predict(train, test)
    return out


# ------------------------------------------------------------------- ridge
class Standardizer:
    """Per-feature centring and scaling fitted on training rows only."""

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(0)
        self.scale = x.std(0)
        self.scale[self.scale < 1e-8] = 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


def choose_alphas(x: np.ndarray, targets: np.ndarray, groups: Sequence[str], inner_folds: int = 5, seed: int = 0,
                  alphas: Sequence[float] = RIDGE_ALPHAS) -> np.ndarray:
    """Per attribute, the ridge strength with the lowest grouped inner-CV squared error on the rows
    where that attribute is labelled. Attributes labelled on the same rows share one SVD per fold."""
    groups = np.asarray(groups)
    folds = grouped_folds(groups, min(inner_folds, len(set(groups))), seed)
    k = targets.shape[1]
    err = np.zeros((k, len(alphas)))
    labelled = ~np.isnan(targets)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        for mask in {tuple(labelled[:, j]) for j in range(k)}:
            mask = np.asarray(mask)
            cols = [j for j in range(k) if (labelled[:, j] == mask).all()]
            a, b = tr & mask, te & mask
            if a.sum() < 2 or not b.any():
                continue
            scaler = Standardizer(x[a])
            xa, xb = scaler(x[a]), scaler(x[b])
            y_mean = targets[a][:, cols].mean(0)
            u, s, vt = np.linalg.svd(xa - xa.mean(0), full_matrices=False)
            uty = u.T @ (targets[a][:, cols] - y_mean)
            proj = (xb - xa.mean(0)) @ vt.T
            for i, alpha in enumerate(alphas):
                pred = proj @ ((s / (s**2 + alpha))[:, None] * uty) + y_mean
                err[cols, i] += ((pred - targets[b][:, cols]) ** 2).sum(0)
    return np.asarray(alphas)[err.argmin(1)]


def fit_ridge_head(x: np.ndarray, targets: np.ndarray, groups: Sequence[str], inner_folds: int = 5, seed: int = 0,
                   alphas: Sequence[float] = RIDGE_ALPHAS) -> dict[str, np.ndarray]:
    """One ridge regression per attribute on standardised features, each with its own strength
    chosen on grouped inner folds; rows where an attribute is unlabelled (NaN) are left out of that
    attribute's fit. Returns the head as arrays: ``y = ((x - mean) / scale) @ weight + bias``."""
    groups = np.asarray(groups)
    scaler = Standardizer(x)
    xs = scaler(x)
    k = targets.shape[1]
    weight = np.zeros((x.shape[1], k))
    bias = np.zeros(k)
    chosen = choose_alphas(x, targets, groups, inner_folds, seed, alphas) if len(set(groups)) >= 2 else None
    alpha_used = np.zeros(k)
    labelled = ~np.isnan(targets)
    fit = []
    for j in range(k):
        y = targets[labelled[:, j], j]
        if chosen is None or len(y) < 2 or np.ptp(y) == 0 or len(set(groups[labelled[:, j]])) < 2:
            bias[j] = y.mean() if len(y) else 0.0
        else:
            fit.append(j)
    # One SVD per set of labelled rows (most attributes share one): w = V diag(s / (s^2 + alpha)) U^T y,
    # which costs O(n^2 d) even when there are more features than rows.
    for mask in {tuple(labelled[:, j]) for j in fit}:
        mask = np.asarray(mask)
        cols = [j for j in fit if (labelled[:, j] == mask).all()]
        xo = xs[mask]
        mu = xo.mean(0)
        u, s, vt = np.linalg.svd(xo - mu, full_matrices=False)
        for j in cols:
            y = targets[mask, j]
            w = vt.T @ (s / (s**2 + chosen[j]) * (u.T @ (y - y.mean())))
            weight[:, j] = w
            bias[j] = y.mean() - mu @ w
            alpha_used[j] = chosen[j]
    return {"mean": scaler.mean, "scale": scaler.scale, "weight": weight, "bias": bias, "alpha": alpha_used}


def apply_head(head: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return ((x - head["mean"]) / head["scale"]) @ head["weight"] + head["bias"]


# ------------------------------------------------------------------- metrics
def _pearson(p: np.ndarray, y: np.ndarray) -> float:
    if len(y) < MIN_ITEMS_FOR_CORRELATION or np.ptp(y) == 0 or np.ptp(p) == 0:
        return math.nan
    return float(np.corrcoef(p, y)[0, 1])


def _spearman(p: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    return _pearson(rankdata(p), rankdata(y))


def _none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def pooled_metrics(predictions: np.ndarray, labels: np.ndarray, groups: Sequence[str], schema: AttributeSchema,
                   headline: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per attribute: Pearson and Spearman over all rows (NaN labels skipped), MAE, n, and 95%
    percentile intervals from ``n_boot`` resamples of whole groups; plus the mean Pearson over
    ``headline`` attributes with its own interval (the mean is recomputed inside each resample)."""
    groups = np.asarray([str(g) for g in groups])
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    boots = [np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))]) for _ in range(n_boot)]
    head_idx = [schema.names.index(a) for a in headline]

    per = {}
    boot_pearson = np.full((n_boot, len(schema)), np.nan)
    for j, name in enumerate(schema.names):
        ok = ~np.isnan(labels[:, j])
        p, y = predictions[:, j], labels[:, j]
        entry = {"pearson": _none(_pearson(p[ok], y[ok])), "spearman": _none(_spearman(p[ok], y[ok])),
                 "mae": _none(float(np.abs(p[ok] - y[ok]).mean())) if ok.any() else None, "n": int(ok.sum())}
        if n_boot and ok.sum() >= MIN_ITEMS_FOR_CORRELATION:
            bp, bs = [], []
            for b, idx in enumerate(boots):
                idx = idx[ok[idx]]
                boot_pearson[b, j] = _pearson(p[idx], y[idx])
                bp.append(boot_pearson[b, j])
                bs.append(_spearman(p[idx], y[idx]))
            entry["pearson_ci"] = _interval(bp)
            entry["spearman_ci"] = _interval(bs)
        per[name] = entry
    values = [per[a]["pearson"] for a in headline]
    mean = None if any(v is None for v in values) else float(np.mean(values))
    result = {"attributes": per, "headline_attributes": list(headline), "headline_pearson": mean,
              "n_items": int(len(labels)), "n_groups": int(len(unique))}
    if n_boot and mean is not None:
        result["headline_pearson_ci"] = _interval(boot_pearson[:, head_idx].mean(1))
    return result


def _interval(samples) -> list[float] | None:
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if len(s) < 10:
        return None
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))]


def paired_difference(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray, groups: Sequence[str],
                      schema: AttributeSchema, headline: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Headline mean Pearson of ``pred_a`` minus that of ``pred_b`` on the same rows, with a 95%
    interval from resampling whole groups, both models scored on the same resample each time.
    An interval above 0 says ``a`` is better on conversations like these, which comparing two
    separate intervals cannot say."""
    groups = np.asarray([str(g) for g in groups])
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    cols = [schema.names.index(a) for a in headline]

    def diff(idx):
        values = []
        for j in cols:
            ok = idx[~np.isnan(labels[idx, j])]
            values.append(_pearson(pred_a[ok, j], labels[ok, j]) - _pearson(pred_b[ok, j], labels[ok, j]))
        return float(np.mean(values))

    point = diff(np.arange(len(labels)))
    samples = [diff(np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))]))
               for _ in range(n_boot)]
    return {"difference": _none(point), "ci": _interval(samples)}


def fold_spread(predictions: np.ndarray, labels: np.ndarray, folds: np.ndarray, schema: AttributeSchema,
                headline: Sequence[str]) -> dict:
    """The headline mean Pearson of each fold on its own, and their mean and standard deviation."""
    per_fold = []
    for f in np.unique(folds):
        rows = folds == f
        vals = []
        for a in headline:
            j = schema.names.index(a)
            ok = rows & ~np.isnan(labels[:, j])
            vals.append(_pearson(predictions[ok, j], labels[ok, j]))
        per_fold.append(float(np.mean(vals)) if all(math.isfinite(v) for v in vals) else None)
    finite = [v for v in per_fold if v is not None]
    return {"per_fold": per_fold, "mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None}


def report(name: str, predictions: np.ndarray, labels: np.ndarray, groups, folds: np.ndarray,
           schema: AttributeSchema, headline: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Everything one model's out-of-fold predictions earn: pooled metrics with intervals and the
    spread across folds."""
    out = {"model": name, **pooled_metrics(predictions, labels, groups, schema, headline, n_boot, seed)}
    out["folds"] = fold_spread(predictions, labels, folds, schema, headline)
    return out


# ------------------------------------------------------------------- baselines
def constant_baseline(targets: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each held-out row predicted by its training folds' mean (per attribute). Its correlations are
    not meaningful (the prediction barely varies); its MAE is the floor a model must beat."""
    def fit_predict(train, test):
        labelled = ~np.isnan(targets[train])
        total = np.where(labelled, targets[train], 0.0).sum(0)
        mean = np.divide(total, labelled.sum(0), out=np.zeros(targets.shape[1]), where=labelled.sum(0) > 0)
        return np.tile(mean, (len(test), 1))

    return out_of_fold(folds, fit_predict, targets.shape[1])


def ridge_probe(features: np.ndarray, targets: np.ndarray, groups: Sequence[str], folds: np.ndarray,
                inner_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Ridge regression on frozen features, strength chosen per attribute on inner grouped folds of
    each training split: the probe a trained APM has to beat."""
    groups = np.asarray(groups)

    def fit_predict(train, test):
        head = fit_ridge_head(features[train], targets[train], groups[train], inner_folds, seed)
        return apply_head(head, features[test])

    return out_of_fold(folds, fit_predict, targets.shape[1])


# ------------------------------------------------------------------- what the labels allow
def rater_noise_ceiling(means: np.ndarray, counts: np.ndarray, groups: Sequence[str], min_stratum: int = 20,
                        n_boot: int = 1000, seed: int = 0) -> dict:
    """How well a perfect model could correlate with averaged ratings, from how their spread
    shrinks with the number of raters.

    A reply's label is the mean of ``c`` raters: ``m = t + e`` with ``Var(e) = s2 / c``. Among the
    replies rated by ``c`` people the variance of ``m`` is then ``vt + s2 / c``; a weighted line
    through the strata of ``c`` (each with at least ``min_stratum`` replies) gives the variance
    of the true value ``vt`` and one rater's noise ``s2``. A model that predicts ``t`` exactly
    reaches a pooled Pearson of ``sqrt(vt / (vt + s2 * mean(1 / c)))`` on these replies: the
    ceiling. It assumes replies rated by fewer people are not otherwise different; with fewer than
    two strata the ceiling is not identifiable (``None``). The interval resamples whole groups.
    """
    means, counts = np.asarray(means, dtype=float), np.asarray(counts, dtype=float)
    groups = np.asarray([str(g) for g in groups])
    ok = np.isfinite(means) & (counts >= 1)
    means, counts, groups = means[ok], counts[ok], groups[ok]

    def estimate(idx: np.ndarray) -> tuple[float, float, float] | None:
        m, c = means[idx], counts[idx]
        strata = [(k, m[c == k]) for k in np.unique(c) if (c == k).sum() >= min_stratum]
        if len(strata) < 2:
            return None
        inv = np.array([1.0 / k for k, _ in strata])
        var = np.array([v.var(ddof=1) for _, v in strata])
        w = np.array([len(v) for _, v in strata], dtype=float)
        design = np.stack([np.ones_like(inv), inv], axis=1) * np.sqrt(w)[:, None]
        (vt, s2), *_ = np.linalg.lstsq(design, var * np.sqrt(w), rcond=None)
        if vt <= 0:
            return 0.0, float(s2), 0.0
        return float(vt), float(s2), math.sqrt(vt / (vt + max(s2, 0.0) * float(np.mean(1.0 / c))))

    point = estimate(np.arange(len(means)))
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    samples = []
    if point is not None:
        for _ in range(n_boot):
            est = estimate(np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))]))
            samples.append(est[2] if est is not None else np.nan)
    strata = {int(k): int((counts == k).sum()) for k in np.unique(counts)}
    if point is None:
        return {"ceiling": None, "ci": None, "true_variance": None, "rater_variance": None, "strata": strata}
    return {"ceiling": point[2], "ci": _interval(samples), "true_variance": point[0], "rater_variance": point[1],
            "strata": strata}
