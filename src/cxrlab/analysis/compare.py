"""Baseline vs challenger: ``compare(CompareConfig) -> CompareResult`` evaluates two models on the same items and
judges the difference with McNemar's exact test on paired correctness and a paired bootstrap CI of the accuracy
difference; a verdict says "no significant difference" unless the paired test says otherwise."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlab.analysis.configs import CompareConfig
from cxrlab.analysis.evaluate import EvalConfig, EvalResult, evaluate
from cxrlab.analysis.metrics import (
    McNemarResult,
    bootstrap_confusions,
    bootstrap_indices,
    confusion_matrix,
    mcnemar_test,
    metrics_from_confusion,
    paired_bootstrap_diff,
    percentile_ci,
)
from cxrlab.atomic import json_safe, write_json
from cxrlab.data.classes import order_costly_first
from cxrlab.data.items import resolve_items
from cxrlab.errors import CxrlabError, EvalError
from cxrlab.runs import (
    ATTENTION_FILE,
    find_run_dir,
)


@dataclass
class CompareResult:
    out_dir: Path
    baseline: EvalResult
    challenger: EvalResult
    n: int
    mcnemar: McNemarResult
    accuracy_diff: float  # challenger - baseline
    accuracy_diff_ci: tuple[float, float]
    f1_diff: float
    f1_diff_ci: tuple[float, float]
    both_right: int
    both_wrong: int
    errors: pd.DataFrame  # class, fn_baseline, fn_challenger, fp_baseline, fp_challenger (costly class first)
    significant: bool
    verdict: str
    attention: pd.DataFrame | None
    paths: dict[str, Path]


# --------------------------------------------------------------------------------------------- compare


def _fmt_pt(x: float) -> str:
    return f"{x * 100:+.1f}"


def make_verdict(
    n: int, mc: McNemarResult, diff: float, ci: tuple[float, float], alpha: float = 0.05, level: float = 0.95
) -> tuple[bool, str]:
    """Plain-language verdict from McNemar's exact p-value (significant when p < ``alpha``) and the accuracy
    difference (challenger - baseline) with its ``level`` bootstrap CI."""
    ci_txt = f", {100 * level:.0f}% CI [{_fmt_pt(ci[0])}, {_fmt_pt(ci[1])}]" if all(map(math.isfinite, ci)) else ""
    tail = (
        f"McNemar exact p={mc.p_exact:.3g} ({mc.b} vs {mc.c} discordant); "
        f"accuracy difference {_fmt_pt(diff)} pt{ci_txt}"
    )
    if mc.p_exact < alpha:
        better = "challenger" if mc.c > mc.b else "baseline"
        return True, f"significant difference at n={n}: the {better} is more accurate; {tail}"
    return False, f"no significant difference at n={n}: {tail}"


ATTENTION_KEYS = ("in_lungs", "on_text", "on_border", "on_text_where_text", "with_text", "n_images")


def _read_attention(run_dir: Path | None, split: str) -> dict[str, float] | None:
    """Mean attention shares of a run's explanation (``explain-*/attention.json``, written by cxrlab.analysis.explain).

    Prefers an explanation of every image (not errors only) on the compared split, then the newest."""
    if run_dir is None:
        return None
    docs = []
    for f in run_dir.glob(f"explain*/{ATTENTION_FILE}"):
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("summary"), dict):
            rank = (doc.get("subset", "all") == "all", doc.get("split") == split, f.stat().st_mtime)
            docs.append((rank, doc))
    if not docs:
        return None
    summary = max(docs, key=lambda x: x[0])[1]["summary"]
    out = {k: float(summary[k]) for k in ATTENTION_KEYS if isinstance(summary.get(k), int | float)}
    from cxrlab.review.core import read_agreement  # a radiologist's verdict on the CAMs (cxrlab review --export)

    out.update(read_agreement(run_dir) or {})
    return out or None


def compare(cfg: CompareConfig) -> CompareResult:
    """Evaluate baseline and challenger on the same items and judge the difference.

    Both are evaluated with ``evaluate`` (full artefacts under ``<out>/baseline`` and ``<out>/challenger``);
    the comparison pairs predictions by path. Without ``--data`` their own splits must hold the same items.
    """
    from cxrlab.inference.bundle import load_bundle, resolve_bundle_dir

    metas = []
    for name, t in (("baseline", cfg.baseline), ("challenger", cfg.challenger)):
        try:
            metas.append(load_bundle(resolve_bundle_dir(t)).meta)
        except CxrlabError as e:
            raise EvalError(f"{name}: {e}") from e
    if sorted(metas[0].class_names) != sorted(metas[1].class_names):
        raise EvalError(
            f"baseline classes {metas[0].class_names} differ from challenger classes {metas[1].class_names}; "
            "models are only comparable on the same classes"
        )
    if cfg.data is None:
        items = []
        for t, m in ((cfg.baseline, metas[0]), (cfg.challenger, metas[1])):
            rd = find_run_dir(resolve_bundle_dir(t)) or find_run_dir(Path(t))
            items.append(resolve_items(rd or resolve_bundle_dir(t), cfg.split, None, m.class_names, m.config or {}))
        a, b = set(items[0].paths), set(items[1].paths)
        if a != b:
            raise EvalError(
                f"baseline and challenger were trained on different splits ({len(a ^ b)} of {len(a | b)} "
                f"'{cfg.split}' items differ: {items[0].source} vs {items[1].source}); pass --data to compare them "
                "on one set"
            )
    out = Path(cfg.out) if cfg.out else Path(f"compare-{Path(cfg.baseline).name}-vs-{Path(cfg.challenger).name}")
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "split": cfg.split,
        "data": cfg.data,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "n_boot": cfg.n_boot,
        "ci_level": cfg.ci_level,
        "n_bins": cfg.n_bins,
        "device": cfg.device,
        "progress": cfg.progress,
        "report": cfg.report,
        "wandb": "off",
        "costly_class": cfg.costly_class,
    }
    base = evaluate(EvalConfig(target=cfg.baseline, out=out / "baseline", **common))
    chal = evaluate(EvalConfig(target=cfg.challenger, out=out / "challenger", **common))

    # pair by path: a file unreadable for one is unreadable for both, but be exact about it
    pa = base.predictions.set_index("path")
    pc = chal.predictions.set_index("path")
    keys = [p for p in pa.index if p in pc.index]
    if not keys:
        raise EvalError("baseline and challenger share no evaluated items")
    ca = pa.loc[keys, "correct"].to_numpy(bool)
    cc = pc.loc[keys, "correct"].to_numpy(bool)
    n = len(keys)
    mc = mcnemar_test(int(np.sum(ca & ~cc)), int(np.sum(~ca & cc)))
    diff, diff_ci = paired_bootstrap_diff(ca, cc, cfg.n_boot, cfg.seed, cfg.ci_level)

    # paired macro-F1 difference on the same resamples
    classes = base.classes
    cidx = {c: i for i, c in enumerate(classes)}
    yt = pa.loc[keys, "label"].map(cidx).to_numpy()
    ya = pa.loc[keys, "prediction"].map(cidx).to_numpy()
    yc = pc.loc[keys, "prediction"].map(cidx).to_numpy()
    k = len(classes)
    present = confusion_matrix(yt, yt, k).sum(axis=1) > 0
    f1a = float(metrics_from_confusion(confusion_matrix(yt, ya, k), present)["f1_macro"])
    f1c = float(metrics_from_confusion(confusion_matrix(yt, yc, k), present)["f1_macro"])
    f1_ci: tuple[float, float] = (math.nan, math.nan)
    if cfg.n_boot > 0:
        idx = bootstrap_indices(n, cfg.n_boot, cfg.seed)
        fa = metrics_from_confusion(bootstrap_confusions(yt, ya, k, idx), present)["f1_macro"]
        fc = metrics_from_confusion(bootstrap_confusions(yt, yc, k, idx), present)["f1_macro"]
        f1_ci = percentile_ci(fc - fa, cfg.ci_level)

    cma, cmc = confusion_matrix(yt, ya, k), confusion_matrix(yt, yc, k)
    rows = []
    for c in order_costly_first(classes, base.costly_class or ""):
        i = cidx[c]
        rows.append(
            {
                "class": c,
                "support": int(cma[i].sum()),
                "fn_baseline": int(cma[i].sum() - cma[i, i]),
                "fn_challenger": int(cmc[i].sum() - cmc[i, i]),
                "fp_baseline": int(cma[:, i].sum() - cma[i, i]),
                "fp_challenger": int(cmc[:, i].sum() - cmc[i, i]),
            }
        )
    errors = pd.DataFrame(rows)
    significant, verdict = make_verdict(n, mc, diff, diff_ci, cfg.alpha, cfg.ci_level)

    att_a, att_c = _read_attention(base.run_dir, cfg.split), _read_attention(chal.run_dir, cfg.split)
    attention = None
    if att_a and att_c:
        keys_att = [k_ for k_ in att_a if k_ in att_c]
        if keys_att:

            def col(att: dict[str, float]) -> list[Any]:  # counts stay integers in the table
                return [int(att[x]) if x in ("n_images", "review_n") else att[x] for x in keys_att]

            attention = pd.DataFrame(
                {"score": keys_att, "baseline": col(att_a), "challenger": col(att_c)}, dtype=object
            )

    result = CompareResult(
        out_dir=out,
        baseline=base,
        challenger=chal,
        n=n,
        mcnemar=mc,
        accuracy_diff=diff,
        accuracy_diff_ci=diff_ci,
        f1_diff=f1c - f1a,
        f1_diff_ci=f1_ci,
        both_right=int(np.sum(ca & cc)),
        both_wrong=int(np.sum(~ca & ~cc)),
        errors=errors,
        significant=significant,
        verdict=verdict,
        attention=attention,
        paths={},
    )
    if cfg.report:
        from cxrlab.report.figures import write_compare_confusion

        result.paths["confusion_png"] = write_compare_confusion(result, out / "confusion_matrices.png")
    result.paths["json"] = out / "compare.json"
    _write_compare_json(result, cfg)
    if cfg.report:
        from cxrlab.report.compare_page import write_compare_report

        result.paths["report"] = write_compare_report(result, out / "compare.html")
    return result


def _write_compare_json(r: CompareResult, cfg: CompareConfig) -> None:
    p = r.baseline.prefix
    headline = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro", "ece"]
    side = {}
    for name, e in (("baseline", r.baseline), ("challenger", r.challenger)):
        side[name] = {
            "target": str(cfg.baseline if name == "baseline" else cfg.challenger),
            "bundle": str(e.bundle_dir),
            "n": e.n,
            "metrics": {k: e.metrics.get(f"{p}/{k}") for k in headline}
            | {k.split("/", 1)[1]: v for k, v in e.metrics.items() if "/recall_" in k},
            "ci": {k.split("/", 1)[1]: list(v) for k, v in e.ci.items()},
            "confusion_matrix": e.confusion,
        }
    doc = {
        "n": r.n,
        "classes": r.baseline.classes,
        "data": r.baseline.data_source,
        "baseline": side["baseline"],
        "challenger": side["challenger"],
        "both_right": r.both_right,
        "both_wrong": r.both_wrong,
        "mcnemar": {
            "b_baseline_only_correct": r.mcnemar.b,
            "c_challenger_only_correct": r.mcnemar.c,
            "p_exact": r.mcnemar.p_exact,
            "p_midp": r.mcnemar.p_midp,
            "chi2_cc": r.mcnemar.chi2,
            "p_chi2_cc": r.mcnemar.p_chi2,
        },
        "accuracy_diff": r.accuracy_diff,
        "accuracy_diff_ci": list(r.accuracy_diff_ci),
        "f1_macro_diff": r.f1_diff,
        "f1_macro_diff_ci": list(r.f1_diff_ci),
        "ci_method": f"paired percentile bootstrap, {cfg.n_boot} resamples, seed {cfg.seed}",
        "alpha": cfg.alpha,
        "significant": r.significant,
        "verdict": r.verdict,
        "errors": r.errors.to_dict(orient="records"),
        "attention": r.attention.to_dict(orient="records") if r.attention is not None else None,
        "per_source": {
            name: e.per_source.to_dict(orient="records") if e.per_source is not None else None
            for name, e in (("baseline", r.baseline), ("challenger", r.challenger))
        },
        "warnings": {"baseline": r.baseline.warnings, "challenger": r.challenger.warnings},
    }
    write_json(r.paths["json"], json_safe(doc))
