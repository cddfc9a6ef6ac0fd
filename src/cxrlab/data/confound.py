"""The confound check of the data audit: can the class be predicted from image statistics alone (size,
intensity, sharpness, text)? Cross-validated balanced accuracy per feature group, against chance."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

CONFOUND_MARGIN = 0.2  # warn when a feature group's balanced accuracy is this far above 1/k
FEATURE_GROUPS: dict[str, list[str]] = {
    "image size/aspect": ["width", "height", "aspect"],
    "intensity/exposure": ["mean", "std", "dark_frac", "bright_frac"],
    "sharpness": ["log_sharpness"],
    "burned-in text/markers": ["text_score", "text_glyphs"],
}


def _cv_predict(x: np.ndarray, y: np.ndarray, folds: int, seed: int, model: str) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier
    from threadpoolctl import threadpool_limits

    if model == "gbm":
        clf = HistGradientBoostingClassifier(
            max_iter=40, learning_rate=0.15, min_samples_leaf=5, early_stopping=False, random_state=seed
        )
    else:
        clf = DecisionTreeClassifier(max_depth=4, min_samples_leaf=5, random_state=seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # one OpenMP thread: the data are tiny, and on a busy machine HistGradientBoosting's thread team is
    # ~100x slower than a single thread (measured: 55 s vs 0.6 s for 1,500 rows at load 13 on 2 cores)
    with threadpool_limits(limits=1):
        return cross_val_predict(clf, x, y, cv=cv)


def confound_score(feats: pd.DataFrame, classes: list[str], folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """How well trivial image statistics alone predict the label (cross-validated), vs chance.

    Returns ``{"all": {...}, "groups": {name: {...}}, "features": {name: balanced_accuracy}, "chance_*",
    "warnings": [...]}``; each entry holds accuracy, balanced_accuracy and per-class recall. Skipped (with a
    reason) when a class has fewer images than folds or there is one class.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

    ok = feats[feats["error"] == ""].copy()
    ok["log_sharpness"] = np.log1p(ok["sharpness"].astype(float))
    y = ok["label"].to_numpy(dtype=object)
    counts = pd.Series(y).value_counts()
    k = len(classes)
    res: dict[str, Any] = {
        "n": int(len(ok)),
        "folds": folds,
        "seed": seed,
        "model": "HistGradientBoostingClassifier (groups, all); DecisionTree depth 4 (single features)",
        "chance_accuracy": round(float(counts.max() / max(1, len(y))), 4) if len(y) else 0.0,
        "chance_balanced_accuracy": round(1.0 / max(k, 1), 4),
        "margin": CONFOUND_MARGIN,
        "groups": {},
        "features": {},
        "warnings": [],
    }
    if k < 2 or counts.min() < 2:
        res["skipped"] = "needs at least two classes with two readable images each"
        return res
    folds = int(min(folds, counts.min()))
    res["folds"] = folds

    def score(cols: list[str], model: str) -> dict[str, Any]:
        pred = _cv_predict(ok[cols].to_numpy(dtype=float), y, folds, seed, model)
        rec = recall_score(y, pred, labels=classes, average=None, zero_division=0)
        return {
            "accuracy": round(float(accuracy_score(y, pred)), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
            "recall": {c: round(float(r), 4) for c, r in zip(classes, rec, strict=True)},
            "features": cols,
        }

    all_cols = [c for cols in FEATURE_GROUPS.values() for c in cols]
    res["all"] = score(all_cols, "gbm")
    for name, cols in FEATURE_GROUPS.items():
        res["groups"][name] = score(cols, "gbm")
    for c in all_cols:
        res["features"][c] = score([c], "tree")["balanced_accuracy"]
    chance = res["chance_balanced_accuracy"]
    flagged = []
    for name, g in sorted(res["groups"].items(), key=lambda kv: -kv[1]["balanced_accuracy"]):
        if g["balanced_accuracy"] >= chance + CONFOUND_MARGIN:
            best = max(g["recall"], key=g["recall"].get)
            flagged.append(
                f"{name} alone predicts the class with {g['balanced_accuracy']:.2f} balanced accuracy "
                f"(chance {chance:.2f}; it recognises {best} with recall {g['recall'][best]:.2f}): "
                "the model can learn the source, not the disease"
            )
    if res["all"]["balanced_accuracy"] >= chance + CONFOUND_MARGIN and not flagged:
        flagged.append(
            f"trivial image statistics together predict the class with {res['all']['balanced_accuracy']:.2f} "
            f"balanced accuracy (chance {chance:.2f}): the model can learn the source, not the disease"
        )
    if flagged:
        a = res["all"]
        flagged.insert(
            0,
            f"confound score: trivial image statistics (size, aspect, intensity, sharpness, text) predict the class "
            f"with {a['balanced_accuracy']:.2f} balanced accuracy (chance {chance:.2f}), {a['accuracy']:.2f} accuracy "
            f"(majority {res['chance_accuracy']:.2f})",
        )
    res["warnings"] = flagged
    res["confounded"] = bool(flagged)
    return res
