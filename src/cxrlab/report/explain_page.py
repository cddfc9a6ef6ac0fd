"""The explanation page (``explain.html``): a sortable, filterable image table with Grad-CAM overlays; no CDN."""

from __future__ import annotations

import html
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

    e = html.escape
    model = doc["model"]
    border = float(doc["regions"].get("border_frac", 0.08))
    meta = rh.kv(
        [
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
    )
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
    summary = rh.section(
        "Mean attention share of the Grad-CAM mass",
        rh.table(_summary_rows(doc), columns=cols_sum, float_fmt="{:.3f}"),
        "<p>Attention share = part of the CAM mass (CAM normalised to sum 1 per image) inside a region: "
        "<span class=sw style='background:#50dc50'></span> lung fields (classical segmentation), "
        "<span class=sw style='background:#ff00ff'></span> detected burned-in text/markers, and the outer "
        f"{border:.0%} border. Regions may overlap. The areas are what a uniform CAM would put on each region: "
        "a model whose <em>on text</em> is well above the text area looks at the labels.</p>",
    )
    opts = "".join(f"<option>{e(c)}</option>" for c in classes)
    controls = (
        "<div class=controls>"
        f"<label>true class <select id=fclass><option value=''>all</option>{opts}</select></label>"
        f"<label>prediction <select id=fpred><option value=''>all</option>{opts}</select></label>"
        "<label>outcome <select id=foutcome><option value=''>all</option><option value=wrong>errors</option>"
        "<option value=correct>correct</option></select></label>"
        "<label>confidence from <input id=fconf type=number min=0 max=1 step=0.05 value=0 style='width:5em'></label>"
        "<label>to <input id=fconfmax type=number min=0 max=1 step=0.05 value=1 style='width:5em'></label>"
        "<span id=count></span> <span class=caption>(click a column header to sort)</span></div>"
    )
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
    th = ["<th class=l>image</th><th class=l>Grad-CAM</th>"]
    for col, hd, num in cols:
        th.append(f"<th data-key='{_dataset_name(_data_key(col))}' data-num='{int(num)}'>{e(hd)}</th>")
    th.append("<th class=l>file</th>")
    body = []
    for r in table.to_dict("records"):
        data = " ".join(f"data-{_data_key(c)}='{e(str(r[c]))}'" for c, _, _ in cols if c != "correct")
        outcome = "correct" if r["correct"] else "wrong"
        cells = [
            f"<td class=l><img src='{e(r['image'])}' alt='image' loading=lazy></td>",
            f"<td class=l><img src='{e(r['overlay'])}' alt='Grad-CAM' loading=lazy></td>",
            f"<td>{r['index']}</td><td class=l>{e(r['label'])}</td><td class=l>{e(r['prediction'])}</td>",
            f"<td class='l res'>{'correct' if r['correct'] else 'WRONG'}</td><td>{r['confidence']:.3f}</td>",
            *[f"<td>{r[f'p_{c}']:.3f}</td>" for c in classes],
            f"<td>{_fmt(r['in_lungs'])}</td><td>{_fmt(r['on_text'])}</td><td>{_fmt(r['on_border'])}</td>",
            f"<td class=l title='{e(r['path'])}'>{e(Path(r['path']).name)}</td>",
        ]
        cls = "ok" if r["correct"] else "wrong"
        body.append(f"<tr class={cls} data-outcome={outcome} {data}>{''.join(cells)}</tr>")
    images = rh.section(
        "Images",
        "<p>Overlay: Grad-CAM of the predicted class (red = high) on the input as the model sees it, with the "
        "lung fields (green) and detected text (magenta) outlined.</p>",
        controls,
        f"<table id=rows class=rows><thead><tr>{''.join(th)}</tr></thead><tbody>{''.join(body)}</tbody></table>",
    )
    page = rh.page(
        f"Explanations: {model['name']} {model.get('run_id') or ''}".strip(),
        [
            # the shared style plus what the image table needs; the only script sorts and filters (no CDN)
            "<style>\n" + rh.asset("explain.css") + "</style>",
            meta,
            summary,
            images,
            "<script>\n" + rh.asset("explain.js") + "</script>",
        ],
        subtitle=f"{doc['split']} · {len(table)} images · accuracy {_fmt(doc['summary'].get('accuracy'))}",
    )
    rh.write_page(path, page)
