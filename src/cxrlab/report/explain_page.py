"""The explanation page (``explain.html``): a sortable, filterable image table with Grad-CAM overlays; no CDN."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

# --------------------------------------------------------------------------------------------- HTML


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _data_key(name: str) -> str:
    """A column name as an HTML data-* key (lower case letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _dataset_name(key: str) -> str:
    """The JavaScript ``dataset`` property of a data-* key (``p-covid19`` -> ``pCovid19``)."""
    parts = key.split("-")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _summary_rows(doc: dict[str, Any]) -> list[list[Any]]:
    groups = [("all images", doc["summary"])]
    groups += [(f"true {c}", s) for c, s in doc["per_class"].items()]
    groups += [(f"{k} predictions", s) for k, s in doc["by_outcome"].items()]
    keys = ("n_images", "accuracy", "in_lungs", "lung_area", "on_text", "on_text_where_text", "text_area", "with_text")
    keys += ("on_border",)
    return [[name, *[s.get(k) for k in keys]] for name, s in groups if s and s.get("n_images")]


def write_explain_page(path: Path, table: pd.DataFrame, doc: dict[str, Any], classes: list[str]) -> None:
    from cxrlab.report import html as rh

    model = doc["model"]
    border = float(doc["regions"].get("border_frac", 0.08))
    meta = [
        ("model", f"{model['name']} {model.get('run_id') or ''} ({model['bundle']})"),
        ("images", doc["data"]),
        (
            "explained",
            f"{len(table)} ({'errors only; ' if doc['subset'] == 'errors' else ''}"
            f"{doc['n_seen']} read, {len(doc['skipped'])} unreadable)",
        ),
        ("Grad-CAM", f"{doc['method']} of the predicted class ({doc['cam_target']}) on {doc['target_layer']}"),
        ("preprocessing", json.dumps(model.get("preprocess"))),
    ]
    cols_sum = [
        "group",
        "images",
        "accuracy",
        "in lungs",
        "lung area",
        "on text",
        "on text (images with text)",
        "text area",
        "images with text",
        f"on border (area {1 - (1 - 2 * border) ** 2:.2f})",
    ]
    cols: list[tuple[str, str, bool]] = [  # (column, header, numeric)
        ("index", "#", True),
        ("label", "label", False),
        ("prediction", "prediction", False),
        ("correct", "result", False),
        ("confidence", "confidence", True),
        *[(f"p_{c}", f"p({c})", True) for c in classes],
        ("in_lungs", "in lungs", True),
        ("on_text", "on text", True),
        ("on_border", "on border", True),
    ]
    headers = [{"key": _dataset_name(_data_key(col)), "num": int(num), "text": hd} for col, hd, num in cols]
    rows = []
    for r in table.to_dict("records"):
        rows.append(
            {
                "correct": bool(r["correct"]),
                "data": [(_data_key(c), str(r[c])) for c, _, _ in cols if c != "correct"],
                "image": r["image"],
                "overlay": r["overlay"],
                "index": r["index"],
                "label": r["label"],
                "prediction": r["prediction"],
                "confidence": f"{r['confidence']:.3f}",
                "probs": [f"{r[f'p_{c}']:.3f}" for c in classes],
                "regions": [_fmt(r[k]) for k in ("in_lungs", "on_text", "on_border")],
                "path": r["path"],
                "name": Path(r["path"]).name,
            }
        )
    html = rh.render(
        "explain_page.html",
        title=f"Explanations: {model['name']} {model.get('run_id') or ''}".strip(),
        subtitle=f"{doc['split']} · {len(table)} images · accuracy {_fmt(doc['summary'].get('accuracy'))}",
        meta=meta,
        summary=rh.table(_summary_rows(doc), columns=cols_sum, float_fmt="{:.3f}"),
        border=f"{border:.0%}",
        classes=classes,
        headers=headers,
        rows=rows,
    )
    rh.write_page(path, html)
