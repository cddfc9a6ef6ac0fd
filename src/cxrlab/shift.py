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
- **Per-image out-of-distribution flag** (:class:`OodScorer`): the Mahalanobis distance of the image's
  penultimate features (the input of the classifier layer) to the training features, with a Ledoit-Wolf shrunk
  covariance fitted at the end of training and a split-conformal threshold on the validation images' distances
  (the k-th smallest of n with k = ceil((n + 1) * 0.99): an image like the training images is flagged with
  probability at most 1 - k / (n + 1), stored as ``expected_flag_rate``); plus input checks the feature score
  can miss: a colour image (a photo, not a radiograph), a constant image, pixel noise (neighbouring pixels
  uncorrelated) and inverted polarity (bones dark, air bright), from a polarity score whose threshold comes
  from the training images too. A set of images gets a warning when clearly more of them are flagged than
  ``expected_flag_rate`` allows (binomial test, :func:`ood_excess`).

What these checks cannot see (measured, issue #15): a model trained on a confounded collection looks at adult
NIH images and finds features like its adult COVID-19 training images, so the feature score flags few of them;
the shift is in the label given the look. That is what the label-shift and collapse checks are for.

Stored in a bundle: ``bundle.json``'s ``shift`` field (class names, validation confusion matrix, training and
validation priors, the OOD threshold and polarity threshold) and ``shift.safetensors`` (feature mean and
precision matrix).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
        return _json_safe(asdict(self))


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
        return _json_safe(asdict(self))


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


# ------------------------------------------------------------------------------------ per-image flags


def colour_share(data: bytes) -> float:
    """Share of coloured pixels (channels differing by more than ``COLOUR_CHROMA``) of an encoded image; 0 for
    grey, 16-bit and DICOM content (which is never colour here) and for anything Pillow cannot open."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;"):
            return 0.0
        im.draft("RGB", (256, 256))  # JPEG: decode at reduced size
        im = im.convert("RGB")
        im.thumbnail((256, 256))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 0.0
    a = np.asarray(im, dtype=np.int16)
    chroma = a.max(axis=2) - a.min(axis=2)
    return float(np.mean(chroma > COLOUR_CHROMA))


def polarity(gray: np.ndarray) -> float:
    """Positive for a radiograph the usual way round (bone and soft tissue bright, air dark), negative when
    inverted. An odd function of the image (inverting it flips the sign) from three measurements on a 64 x 64
    standardised copy: the spine/mediastinum strip brighter than the lung fields beside it, the lower third
    (diaphragm, abdomen) brighter than the upper lungs, and the intensity skew (negative: few dark pixels).
    Weights fitted by logistic regression on cxr-tiny + cxr-adult versus their inversions (2,948 images each):
    5-fold cross-validated, 100% of inverted images score below the 0.5% quantile of upright ones."""
    import cv2

    s = cv2.resize(np.asarray(gray, np.uint8), (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
    sd = float(s.std())
    if sd < 1e-6:
        return 0.0
    s = (s - s.mean()) / sd
    rows = slice(16, 48)
    centre = s[rows, 27:37].mean() - np.concatenate([s[rows, 8:22].ravel(), s[rows, 42:56].ravel()]).mean()
    low_high = s[48:62, 16:48].mean() - s[4:20, 16:48].mean()
    skew = float((s**3).mean())
    return float(2.59 * centre + 2.92 * low_high - 2.27 * skew)


def pixel_correlation(gray: np.ndarray) -> float:
    """Correlation of horizontally and of vertically neighbouring pixels (the smaller), on a copy at most 128 px
    on its longer side. Radiographs are smooth at that scale: 0.88 to 1 on all 3,109 images of every third file
    of cxr-tiny, cxr-full and cxr-adult (measured); pixel noise is near 0."""
    import cv2

    g = np.asarray(gray, np.uint8)
    f = 128 / max(g.shape)
    if f < 1:
        g = cv2.resize(g, (max(2, round(g.shape[1] * f)), max(2, round(g.shape[0] * f))), interpolation=cv2.INTER_AREA)
    s = g.astype(np.float64)
    out = []
    for a, b in ((s[:, :-1], s[:, 1:]), (s[:-1], s[1:])):
        if a.std() < 1e-9 or b.std() < 1e-9:
            return 1.0
        out.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    return min(out)


def input_problems(gray: np.ndarray, colour: float, polarity_threshold: float | None) -> list[str]:
    """Plain reasons an input is not a chest radiograph like the training images (empty list: none)."""
    out = []
    if colour >= COLOUR_SHARE:
        out.append(f"colour image ({colour:.0%} coloured pixels): not a radiograph")
    if float(np.std(gray)) < CONSTANT_STD:
        out.append("constant image (no structure)")
        return out
    if pixel_correlation(gray) < NOISE_CORR:
        out.append("pixel noise (neighbouring pixels uncorrelated): not a radiograph")
    elif polarity_threshold is not None and polarity(gray) < polarity_threshold:
        out.append("inverted polarity (air bright, bone dark): invert it or check the DICOM photometric tag")
    return out


@dataclass
class OodResult:
    """One image's flag: ``flag`` when the feature score is above the threshold or an input check failed."""

    flag: bool
    score: float | None  # Mahalanobis distance / threshold (> 1 = beyond the threshold); None without statistics
    reasons: list[str] = field(default_factory=list)


class OodScorer:
    """The bundle's shift statistics at inference: feature score + input checks per image."""

    def __init__(self, meta: dict[str, Any], mean: np.ndarray | None, precision: np.ndarray | None) -> None:
        self.meta = meta
        self.mean = mean
        self.precision = precision
        ood = meta.get("ood") or {}
        self.threshold: float | None = ood.get("threshold")
        self.expected_flag_rate: float = float(ood.get("expected_flag_rate") or 1 - OOD_QUANTILE)
        self.polarity_threshold: float | None = meta.get("polarity_threshold")

    @property
    def has_features(self) -> bool:
        return self.mean is not None and self.precision is not None and self.threshold is not None

    def distances(self, feats: np.ndarray) -> np.ndarray:
        """Mahalanobis distances of (N, D) features to the training mean."""
        assert self.mean is not None and self.precision is not None
        x = np.asarray(feats, np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", x, self.precision, x), 0.0))

    def score(
        self, feats: np.ndarray | None, grays: Sequence[np.ndarray], colours: Sequence[float] | None = None
    ) -> list[OodResult]:
        colours = list(colours) if colours is not None else [0.0] * len(grays)
        dist = self.distances(feats) if (feats is not None and self.has_features) else None
        out = []
        for i, g in enumerate(grays):
            reasons = input_problems(g, colours[i], self.polarity_threshold)
            score = None
            if dist is not None:
                score = float(dist[i] / self.threshold)
                if score > 1.0:
                    reasons.append(
                        f"unlike the training images (feature distance {score:.2f}x the threshold that "
                        f"{1 - self.expected_flag_rate:.1%} of images like them stay below)"
                    )
            out.append(OodResult(bool(reasons), score, reasons))
        return out


def ood_excess(n_flagged: int, n: int, expected_rate: float) -> tuple[bool, float]:
    """(warn, p-value): are clearly more of ``n`` images flagged than images like the training images would be?
    One-sided binomial test against ``expected_rate`` (p < ``OOD_ALPHA``) and at least ``OOD_MIN_SHARE``
    flagged: a handful of flags is what the threshold lets through, not a warning."""
    from scipy.stats import binomtest

    if n == 0 or n_flagged == 0:
        return False, 1.0
    p = float(binomtest(n_flagged, n, min(max(expected_rate, 1e-6), 1.0), alternative="greater").pvalue)
    return (p < OOD_ALPHA and n_flagged / n >= OOD_MIN_SHARE), p


def shift_meta_of(meta: Any) -> dict[str, Any]:
    """The ``shift`` dict of a BundleMeta (empty for bundles trained before shift statistics existed)."""
    return dict(getattr(meta, "shift", None) or {})


def load_scorer(bundle_dir: str | Path, meta: Any) -> OodScorer | None:
    """The bundle's :class:`OodScorer`, or None when it has no shift statistics."""
    sm = shift_meta_of(meta)
    if not sm:
        return None
    mean = precision = None
    w = Path(bundle_dir) / SHIFT_WEIGHTS
    if w.is_file():
        from safetensors.numpy import load_file

        t = load_file(str(w))
        mean, precision = t["mean"].astype(np.float64), t["precision"].astype(np.float64)
    return OodScorer(sm, mean, precision)


# ------------------------------------------------------------------------------------- model features


def features_and_probs(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (N, D), softmax probabilities (N, K)) of a timm model in one forward pass: the
    feature map goes through the head twice, once stopping before the classifier (``pre_logits``)."""
    with torch.inference_mode():
        fmap = model.forward_features(x)
        feats = model.forward_head(fmap, pre_logits=True).float()
        logits = model.forward_head(fmap).float()
    return feats.flatten(1).cpu().numpy(), torch.softmax(logits.double(), dim=1).cpu().numpy()


def collect(
    model: torch.nn.Module, loader: Any, device: torch.device | str, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, probabilities, labels) of every batch of ``loader`` ((x, y) batches)."""
    feats, probs, labels = [], [], []
    for x, y in loader:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f, p = features_and_probs(model, x)
        feats.append(f)
        probs.append(p)
        labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(probs), np.concatenate(labels)


# ------------------------------------------------------------------------------------------- fitting


def fit_statistics(
    classes: list[str],
    train_feats: np.ndarray,
    train_prior: Sequence[int],
    val_feats: np.ndarray,
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    train_polarity: np.ndarray | None = None,
    quantile: float = OOD_QUANTILE,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the bundle's ``shift`` dict, the arrays for ``shift.safetensors``) from training and validation
    features, the training class counts and the validation predictions."""
    from sklearn.covariance import LedoitWolf

    k = len(classes)
    lw = LedoitWolf().fit(np.asarray(train_feats, np.float64))
    mean = lw.location_
    precision = lw.get_precision()
    scorer = OodScorer({}, mean, precision)
    val_dist = np.sort(scorer.distances(val_feats))
    n = len(val_dist)
    # split-conformal rank: an image exchangeable with the validation images exceeds it with P <= 1 - rank/(n+1)
    rank = min(n, math.ceil((n + 1) * quantile))
    threshold = float(val_dist[rank - 1])
    y_pred = np.asarray(val_probs).argmax(axis=1)
    cm = np.bincount(np.asarray(val_labels, np.int64) * k + y_pred, minlength=k * k).reshape(k, k)
    meta: dict[str, Any] = {
        "classes": list(classes),
        "val_confusion": cm.tolist(),
        "train_prior": [int(v) for v in train_prior],
        "n_train": int(np.sum(train_prior)),
        "n_val": int(cm.sum()),
        "ood": {
            "method": "Mahalanobis distance of penultimate features (Ledoit-Wolf covariance of training features)",
            "feature_dim": int(mean.shape[0]),
            "n_fit": int(len(train_feats)),
            "shrinkage": float(lw.shrinkage_),
            "quantile": quantile,
            "threshold": threshold,
            "expected_flag_rate": 1 - rank / (n + 1),
            "val_distance_median": float(np.median(val_dist)),
        },
    }
    if train_polarity is not None and len(train_polarity):
        meta["polarity_threshold"] = float(min(0.0, np.quantile(train_polarity, POLARITY_QUANTILE)))
    return meta, {"mean": mean.astype(np.float32), "precision": precision.astype(np.float32)}


def save_statistics(bundle_dir: str | Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``shift.safetensors`` and the ``shift`` field of ``bundle.json`` into a saved bundle."""
    from safetensors.numpy import save

    from cxrlab.atomic import write_bytes_atomic, write_text_atomic
    from cxrlab.bundle import META_FILE

    d = Path(bundle_dir)
    write_bytes_atomic(d / SHIFT_WEIGHTS, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    doc = json.loads((d / META_FILE).read_text())
    doc["shift"] = meta
    write_text_atomic(d / META_FILE, json.dumps(doc, indent=2))


def fit_from_datamodule(model: torch.nn.Module, dm: Any, device: torch.device | str, seed: int = 0) -> tuple:
    """Shift statistics of a trained ``model`` from a datamodule's train and val splits (eval transform; at most
    ``MAX_FIT_IMAGES`` training images, a seeded sample)."""
    from torch.utils.data import DataLoader, Subset

    was_training = model.training
    model.eval()
    try:
        train_loader = dm.loader("train")
        ds = train_loader.dataset
        n = len(ds)
        idx = np.arange(n)
        if n > MAX_FIT_IMAGES:
            idx = np.sort(np.random.default_rng(seed).choice(n, MAX_FIT_IMAGES, replace=False))
            train_loader = DataLoader(Subset(ds, idx.tolist()), batch_size=train_loader.batch_size, shuffle=False)
        tf, _, _ = collect(model, train_loader, device)
        vf, vp, vy = collect(model, dm.loader("val"), device)
        pol = np.array([polarity(ds.image(int(i))) for i in idx])
    finally:
        model.train(was_training)
    return fit_statistics(dm.classes, tf, dm.class_counts("train"), vf, vp, vy, pol)


def fit_bundle(target: str | Path, data: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Fit and store the shift statistics of an existing bundle (``train`` does this itself; this is for bundles
    trained before, or with ``shift_stats: false``) from its training split or ``data`` (a split directory).
    Returns the ``shift`` dict written into the bundle."""
    from cxrlab.bundle import load_bundle, resolve_bundle_dir
    from cxrlab.config import Config, build_config
    from cxrlab.datamodule import CXRDataModule, resolve_split
    from cxrlab.evaluate import _run_split_dir, find_run_dir, read_summary
    from cxrlab.predict import resolve_device

    bdir = resolve_bundle_dir(target)
    dev = resolve_device(device)
    bundle = load_bundle(bdir, device=dev)
    if data is None:
        run_dir = find_run_dir(bdir)
        data = _run_split_dir(run_dir, read_summary(run_dir), bundle.meta.config or {})
        if data is None:
            raise ShiftError(f"{bdir} does not record its training split; pass the split directory (--data)")
    info = resolve_split(data)
    if list(info.classes) != list(bundle.meta.class_names):
        raise ShiftError(f"the split's classes {info.classes} are not the bundle's {bundle.meta.class_names}")
    m = bundle.meta
    known = {k: v for k, v in (m.config or {}).items() if k in Config.model_fields}
    # what the bundle owns wins over its stored config (a bare bundle may have none)
    own = {"img_size": list(m.img_size), "in_chans": m.in_chans, "preprocess": m.preprocess, "model_name": m.model_name}
    cfg = build_config(Config, {**known, **own, "data": str(info.root), "num_classes": None}, source=str(bdir))
    dm = CXRDataModule(cfg, info, bundle.meta.mean, bundle.meta.std)
    meta, arrays = fit_from_datamodule(bundle.model, dm, dev, seed=cfg.seed)
    save_statistics(bdir, meta, arrays)
    return meta


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
