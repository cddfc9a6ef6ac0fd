"""The baseline-vs-challenger page (``cxrlab compare``): headline metrics side by side with their CIs, the
paired tests, errors per class, the confusion matrices and where the models look."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from cxrlab.report import html as rh
from cxrlab.runs import REPORT_FILE

if TYPE_CHECKING:
    from cxrlab.analysis.compare import CompareResult


def _pt_ci(ci: tuple[float, float]) -> str:
    if not all(math.isfinite(v) for v in ci):
        return ""
    return f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"


def write_compare_report(r: CompareResult, path: Path) -> Path:
    p = r.baseline.prefix
    b, c = r.baseline, r.challenger
    names = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro", "ece", "nll"]
    costly = b.costly_class  # the baseline's (the one asked for, else its run's)
    names += [f"recall_{x}" for x in ([costly] if costly else []) + [x for x in b.classes if x != costly]]
    rows = []
    for n_ in names:
        key = f"{p}/{n_}"
        if key not in b.metrics and key not in c.metrics:
            continue
        vb, vc = b.metrics.get(key, math.nan), c.metrics.get(key, math.nan)
        delta = f"{vc - vb:+.3f}" if math.isfinite(vb) and math.isfinite(vc) else "–"
        rows.append([n_, rh.ci_cell(vb, b.ci.get(key)), rh.ci_cell(vc, c.ci.get(key)), delta])
    mc = r.mcnemar
    tests = [
        ["both right", r.both_right],
        ["both wrong", r.both_wrong],
        ["only baseline right (b)", mc.b],
        ["only challenger right (c)", mc.c],
        ["McNemar exact p (two-sided)", f"{mc.p_exact:.4g}"],
        ["McNemar mid-p", f"{mc.p_midp:.4g}"],
        ["McNemar χ² (continuity-corrected) p", f"{mc.p_chi2:.4g}"],
        [
            "accuracy difference (challenger − baseline)",
            f"{r.accuracy_diff * 100:+.1f} pt {_pt_ci(r.accuracy_diff_ci)}",
        ],
        ["macro-F1 difference", f"{r.f1_diff * 100:+.1f} pt {_pt_ci(r.f1_diff_ci)}"],
    ]
    html = rh.render(
        "compare.html",
        title="Baseline vs challenger",
        subtitle=None,
        facts=[
            ("baseline", b.run_dir or b.bundle_dir),
            ("challenger", c.run_dir or c.bundle_dir),
            ("paired images", f"{r.n} from {b.data_source}"),
        ],
        verdict=r.verdict,
        significant=r.significant,
        metrics=rh.table(rows, columns=["metric", "baseline", "challenger", "Δ"]),
        tests=rh.table(tests, columns=["", "value"]),
        costly=costly or b.classes[0],
        errors=rh.table(r.errors.rename(columns=lambda x: x.replace("_", " "))),
        confusion=rh.png_file(r.out_dir / "confusion_matrices.png", "confusion matrices"),
        attention=None if r.attention is None else rh.table(r.attention, float_fmt="{:.3f}"),
        links=[
            (f"baseline/{REPORT_FILE}", "baseline evaluation"),
            (f"challenger/{REPORT_FILE}", "challenger evaluation"),
        ],
    )
    return rh.write_page(path, html)
