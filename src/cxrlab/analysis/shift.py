"""Shift warnings: is the data a model is applied to like the data it was trained on?

Three checks, each cheap enough to run on every ``evaluate`` / ``predict`` / ``serve`` call:

- **Label shift, no labels needed** (:func:`label_shift`): black-box shift estimation (BBSE, Lipton et al. 2018).
  The validation confusion matrix C (joint of true and predicted class, stored in the bundle by ``train``)
  links the class mix of any data set to the mix of predictions the model would make on it. Under the
  training prior pi the model is expected to predict ``C_cond^T pi`` (C_cond = P(predicted | true)); a chi-square
  test compares that with what it actually predicted, and ``w = C^-1 mu`` (mu = predicted shares) estimates the
  data's class proportions ``w * p_val``. It warns when the test rejects (p < ``alpha``) *and* the shares
  differ by at least ``min_tv`` total variation, so a model's own test split (same distribution, sampling
  noise only) does not trigger it. With labels the estimate is also compared with the true mix: a large gap
  means the shift is not (only) in the class mix: the images themselves differ and the predictions are wrong.
- **Collapse, with labels** (:func:`collapse_check`): predicted versus true class counts on the same images,
  tested with the Stuart-Maxwell chi-square test of marginal homogeneity (the paired-data test for "do the
  predictions have the class mix of the truth"), naming the class the predictions pile up on.
- **Per-image out-of-distribution flag** (:class:`cxrlab.analysis.ood.OodScorer`): the Mahalanobis distance of the
  image's penultimate features (the input of the classifier layer) to the training features, with a Ledoit-Wolf shrunk
  covariance fitted at the end of training and a split-conformal threshold on the validation images' distances (the
  k-th smallest of n with k = ceil((n + 1) * 0.99): an image like the training images is flagged with probability at
  most 1 - k / (n + 1), stored as ``expected_flag_rate``); plus input checks the feature score can miss: a colour
  image (a photo, not a radiograph), a constant image, pixel noise (neighbouring pixels uncorrelated) and inverted
  polarity (bones dark, air bright), from a polarity score whose threshold comes from the training images too. A set
  of images gets a warning when clearly more of them are flagged than ``expected_flag_rate`` allows (binomial test,
  :func:`ood_excess`).

This module holds the set-level tests, their thresholds and :func:`shift_checks` (an evaluation's shift section); the
per-image scorer and the model features are in :mod:`cxrlab.analysis.ood`, fitting the statistics in
:mod:`cxrlab.analysis.shift_fit`.

What these checks cannot see (measured, issue #15): a model trained on a confounded collection looks at adult
NIH images and finds features like its adult COVID-19 training images, so the feature score flags few of them;
the shift is in the label given the look. That is what the label-shift and collapse checks are for.

Stored in a bundle: ``bundle.json``'s ``shift`` field (class names, validation confusion matrix, training and
validation priors, the OOD threshold and polarity threshold) and ``shift.safetensors`` (feature mean and
precision matrix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cxrlab.atomic import json_safe
from cxrlab.errors import CxrlabError

SHIFT_WEIGHTS = "shift.safetensors"
LABEL_SHIFT_ALPHA = 1e-3  # p-value below which the class mix is called different ...
LABEL_SHIFT_MIN_TV = 0.10  # ... when the predicted shares also differ by this much (total variation)
LABEL_SHIFT_MIN_N = 30  # fewer images than this: no label-shift test (report only)
ESTIMATE_GAP = 0.15  # |BBSE estimate - true share| of a class above this: the shift is not only in the class mix
COLLAPSE_ALPHA = 1e-3
COLLAPSE_MIN_EXCESS = 0.15  # predicted minus true share of one class ...
COLLAPSE_MIN_SHARE = 0.5  # ... which gets at least this share of all predictions
OOD_QUANTILE = 0.99  # Mahalanobis threshold: split-conformal quantile of the validation images' distances
OOD_ALPHA = 1e-3  # many flagged images: binomial p-value against the expected flag rate below this ...
OOD_MIN_SHARE = 0.10  # ... and at least this share flagged: a heterogeneous collection's own test split can
# exceed the exchangeable 1 - rank/(n+1) (measured: 11 of 194 in one leave-source-out fold, 9 of them
# covid-cxnet figures from papers at 1.0-1.1x the threshold), foreign data is far above it
POLARITY_QUANTILE = 0.002  # polarity threshold at this quantile of the training images' polarity (never above 0)
CONSTANT_STD = 2.0  # grey-level standard deviation below which an image is "constant"
NOISE_CORR = 0.5  # neighbouring-pixel correlation below which an image is noise (radiographs: >= 0.88, measured)
COLOUR_CHROMA = 24  # a pixel is coloured when its channels differ by more than this (0..255) ...
COLOUR_SHARE = 0.05  # ... and an image is a colour image when this share of its pixels are
MAX_FIT_IMAGES = 4000  # training images used to fit the feature statistics (a seeded sample above this)


class ShiftError(CxrlabError):
    """Shift statistics are missing or do not fit the bundle."""


# ------------------------------------------------------------------------------------------ label shift


@dataclass
class LabelShift:
    """Result of :func:`label_shift` (shares are dicts class -> share of the images)."""

    n: int
    predicted: dict[str, float]
    expected: dict[str, float]  # predicted shares the training prior would give (val confusion-corrected)
    estimated: dict[str, float]  # BBSE estimate of the data's class proportions
    prior: dict[str, float]  # training class prior
    tv: float  # total variation between predicted and expected
    statistic: float
    p_value: float
    df: int
    shifted: bool
    true: dict[str, float] | None = None
    estimate_gap: float | None = None  # max |estimated - true| when labels are known
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _shares(counts: np.ndarray, classes: list[str]) -> dict[str, float]:
    n = counts.sum()
    return {c: float(v / n) if n else math.nan for c, v in zip(classes, counts, strict=True)}


def bbse_weights(val_confusion: np.ndarray, predicted_shares: np.ndarray) -> np.ndarray:
    """Importance weights w (q(y)/p_val(y)) solving C w = mu, C[i, j] = P_val(pred=i, true=j); clipped at 0."""
    cm = np.asarray(val_confusion, dtype=float)
    c = (cm / cm.sum()).T  # rows predicted, columns true
    w, *_ = np.linalg.lstsq(c, np.asarray(predicted_shares, float), rcond=None)
    return np.clip(w, 0.0, None)


def label_shift(
    predicted_counts: Sequence[int],
    shift_meta: dict[str, Any],
    true_counts: Sequence[int] | None = None,
    alpha: float = LABEL_SHIFT_ALPHA,
    min_tv: float = LABEL_SHIFT_MIN_TV,
    min_n: int = LABEL_SHIFT_MIN_N,
) -> LabelShift:
    """Black-box shift estimation on the predicted class counts of a data set (see the module doc)."""
    from scipy.stats import chi2_contingency

    classes = list(shift_meta["classes"])
    cm = np.asarray(shift_meta["val_confusion"], dtype=float)
    prior = np.asarray(shift_meta["train_prior"], dtype=float)
    prior = prior / prior.sum()
    k = len(classes)
    pred = np.asarray(predicted_counts, dtype=float)
    if pred.shape != (k,) or cm.shape != (k, k):
        raise ShiftError(f"shift statistics are for {k} classes {classes}; got counts of shape {pred.shape}")
    n = int(pred.sum())
    row = cm.sum(axis=1, keepdims=True)
    cond = np.divide(cm, row, out=np.full_like(cm, 1.0 / k), where=row > 0)  # P(pred | true); unseen: uniform
    expected = cond.T @ prior
    mu = pred / max(n, 1)
    val_prior = cm.sum(axis=1) / cm.sum()
    est = bbse_weights(cm, mu) * val_prior
    est = est / est.sum() if est.sum() > 0 else np.full(k, 1.0 / k)
    tv = float(0.5 * np.abs(mu - expected).sum()) if n else 0.0
    stat, p, dof = 0.0, 1.0, 0
    if n >= min_n:
        n_ref = float(cm.sum())
        table = np.vstack([pred, expected * n_ref])
        keep = table.sum(axis=0) > 0
        if keep.sum() >= 2:
            r = chi2_contingency(table[:, keep], correction=False)
            stat, p, dof = float(r.statistic), float(r.pvalue), int(r.dof)
    shifted = n >= min_n and p < alpha and tv >= min_tv
    res = LabelShift(
        n=n,
        predicted=_shares(pred, classes),
        expected=dict(zip(classes, map(float, expected), strict=True)),
        estimated=dict(zip(classes, map(float, est), strict=True)),
        prior=dict(zip(classes, map(float, prior), strict=True)),
        tv=tv,
        statistic=stat,
        p_value=p,
        df=dof,
        shifted=shifted,
    )
    if true_counts is not None:
        t = np.asarray(true_counts, dtype=float)
        res.true = _shares(t, classes)
        res.estimate_gap = float(np.max(np.abs(est - t / max(t.sum(), 1))))
    res.message = _label_shift_message(res, classes, n < min_n)
    return res


def _pct(d: dict[str, float]) -> str:
    return ", ".join(f"{c} {v:.0%}" for c, v in d.items())


def _label_shift_message(r: LabelShift, classes: list[str], too_few: bool) -> str:
    if too_few:
        return f"label-shift check skipped: {r.n} images (needs at least {LABEL_SHIFT_MIN_N})"
    if not r.shifted:
        return (
            f"label-shift check: predicted class mix ({_pct(r.predicted)}) is consistent with the training prior "
            f"(expected {_pct(r.expected)}; chi-square p={r.p_value:.2g}, total variation {r.tv:.2f})"
        )
    msg = (
        f"label shift: the model predicts {_pct(r.predicted)} on these {r.n} images, but on data like its training "
        f"data it would predict {_pct(r.expected)} (chi-square p={r.p_value:.2g}, total variation {r.tv:.2f}). "
        f"Estimated class proportions here (black-box shift estimation): {_pct(r.estimated)}; training prior "
        f"{_pct(r.prior)}"
    )
    if r.true is not None and r.estimate_gap is not None:
        if r.estimate_gap > ESTIMATE_GAP:
            msg += (
                f". The true class mix is {_pct(r.true)}: the estimate misses it by up to {r.estimate_gap:.0%}, so the "
                "shift is not only in the class mix: these images differ from the training images in a way that "
                "changes what the model predicts, and its predictions here are not trustworthy"
            )
        else:
            msg += f". The true class mix is {_pct(r.true)}: the data differ from training in their class mix"
    else:
        msg += (
            ". Either the class mix differs from training, or the images differ from the training images (another "
            "hospital, scanner or population) and the predictions are unreliable: check a labelled sample"
        )
    return msg


# --------------------------------------------------------------------------------------------- collapse


@dataclass
class Collapse:
    """Result of :func:`collapse_check`."""

    n: int
    true: dict[str, int]
    predicted: dict[str, int]
    statistic: float
    p_value: float
    df: int
    onto: str | None  # the class with the largest excess of predictions over truth
    excess: float  # (predicted - true) share of that class
    collapsed: bool
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def stuart_maxwell(cm: np.ndarray) -> tuple[float, float, int]:
    """Stuart-Maxwell test of marginal homogeneity on a K x K paired table (rows true, columns predicted):
    (chi-square statistic, p-value, degrees of freedom). Equal margins (or no discordant pairs): (0, 1, 0)."""
    from scipy.stats import chi2

    cm = np.asarray(cm, dtype=float)
    d = cm.sum(axis=1) - cm.sum(axis=0)
    s = -(cm + cm.T)
    np.fill_diagonal(s, cm.sum(axis=1) + cm.sum(axis=0) - 2 * np.diag(cm))
    d, s = d[:-1], s[:-1, :-1]  # one margin is redundant
    rank = int(np.linalg.matrix_rank(s)) if s.size else 0
    if rank == 0 or not np.any(d):
        return 0.0, 1.0, 0
    stat = float(d @ np.linalg.pinv(s) @ d)
    return stat, float(chi2.sf(stat, rank)), rank


def collapse_check(
    confusion: np.ndarray,
    classes: list[str],
    alpha: float = COLLAPSE_ALPHA,
    min_excess: float = COLLAPSE_MIN_EXCESS,
    min_share: float = COLLAPSE_MIN_SHARE,
) -> Collapse:
    """Do the predictions pile up on one class? Warns when the Stuart-Maxwell test rejects equal predicted and
    true class counts (p < ``alpha``) and one class gets at least ``min_excess`` of the images more than it has
    and at least ``min_share`` of all predictions (a model that is merely inaccurate spreads its errors; one
    that does not recognise the data answers one class for most of it)."""
    cm = np.asarray(confusion, dtype=np.int64)
    n = int(cm.sum())
    true, pred = cm.sum(axis=1), cm.sum(axis=0)
    stat, p, dof = stuart_maxwell(cm)
    diff = (pred - true) / max(n, 1)
    j = int(np.argmax(diff)) if n else 0
    collapsed = bool(n > 0 and p < alpha and diff[j] >= min_excess and pred[j] / n >= min_share)
    res = Collapse(
        n=n,
        true={c: int(v) for c, v in zip(classes, true, strict=True)},
        predicted={c: int(v) for c, v in zip(classes, pred, strict=True)},
        statistic=stat,
        p_value=p,
        df=dof,
        onto=classes[j] if n else None,
        excess=float(diff[j]) if n else 0.0,
        collapsed=collapsed,
    )
    if collapsed:
        res.message = (
            f"predictions collapse onto {classes[j]}: {int(pred[j]):,} of {n:,} images are predicted {classes[j]} but "
            f"{int(true[j]):,} are (predicted vs true counts: "
            + ", ".join(f"{c} {int(a)} vs {int(b)}" for c, a, b in zip(classes, pred, true, strict=True))
            + f"; Stuart-Maxwell chi-square {stat:.1f}, p={p:.2g}). The model does not recognise these images' "
            "classes; a metric averaged over them hides that"
        )
    else:
        res.message = f"no collapse: predicted and true class counts agree (Stuart-Maxwell p={p:.2g})"
    return res


# ------------------------------------------------------------------------------------ many flagged images


def ood_excess(n_flagged: int, n: int, expected_rate: float) -> tuple[bool, float]:
    """(warn, p-value): are clearly more of ``n`` images flagged than images like the training images would be?
    One-sided binomial test against ``expected_rate`` (p < ``OOD_ALPHA``) and at least ``OOD_MIN_SHARE``
    flagged: a handful of flags is what the threshold lets through, not a warning."""
    from scipy.stats import binomtest

    if n == 0 or n_flagged == 0:
        return False, 1.0
    p = float(binomtest(n_flagged, n, min(max(expected_rate, 1e-6), 1.0), alternative="greater").pvalue)
    return (p < OOD_ALPHA and n_flagged / n >= OOD_MIN_SHARE), p


# ------------------------------------------------------------------------------------ an evaluation's checks


def shift_checks(
    confusion: np.ndarray, classes: list[str], scorer: Any, ood: list[Any] | None
) -> tuple[dict[str, Any], list[str]]:
    """(the ``shift`` section of metrics.json, the warnings that fired): collapse always, label shift and the
    OOD summary when the bundle has shift statistics."""
    from cxrlab.analysis.shift import collapse_check, label_shift

    cm = np.asarray(confusion)
    col = collapse_check(cm, classes)
    doc: dict[str, Any] = {"collapse": col.to_json()}
    warnings = [col.message] if col.collapsed else []
    if scorer is None or "val_confusion" not in scorer.meta:
        doc["note"] = (
            "the bundle has no shift statistics (trained before they existed or with shift_stats: false): no "
            "label-shift check or OOD flag; add them with `cxrlab fit-shift RUN`"
        )
        return doc, warnings
    ls = label_shift(cm.sum(axis=0), scorer.meta, true_counts=cm.sum(axis=1))
    doc["label_shift"] = ls.to_json()
    if ls.shifted:
        warnings.insert(0, ls.message)
    if ood is not None:
        from cxrlab.analysis.shift import ood_excess

        flagged = [r for r in ood if r.flag]
        reasons: dict[str, int] = {}
        for r in flagged:
            for why in r.reasons:
                key = why.split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
        warn, p = ood_excess(len(flagged), len(ood), scorer.expected_flag_rate)
        doc["ood"] = {
            "n": len(ood),
            "n_flagged": len(flagged),
            "share_flagged": len(flagged) / len(ood) if ood else 0.0,
            "expected_flag_rate": scorer.expected_flag_rate,
            "p_value": p,
            "reasons": reasons,
            "feature_score": scorer.has_features,
        }
        if warn:
            warnings.append(
                f"{len(flagged):,} of {len(ood):,} images ({len(flagged) / len(ood):.0%}) are unlike the training "
                f"images (at most {scorer.expected_flag_rate:.1%} of images like them would be; binomial p={p:.2g}): "
                + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
                + " (ood columns of predictions.csv)"
            )
    return doc, warnings
