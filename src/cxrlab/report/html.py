"""Small helpers for self-contained HTML reports (audit, evaluate, explain all use them).

Everything a report needs travels inside the one file: CSS is inline, figures and thumbnails are embedded
as base64 PNG ``<img>`` tags, and there are no scripts or CDN links, so a report opens offline, can be
mailed or attached to a W&B run, and never changes after it is written.

Typical use::

    from cxrlab.report import html as rh

    fig, ax = rh.new_figure(6, 3)
    ax.bar(["a", "b"], [3, 5])
    html = rh.page(
        "My report",
        [
            rh.callout("something to look at", level="warn"),
            rh.section("Counts", rh.figure_tag(fig), rh.table(df)),
            rh.section("Gallery", rh.gallery([(rh.array_to_png_b64(img, 96), "caption")])),
        ],
    )
    rh.write_page(path, html)

Figures are built with ``matplotlib.figure.Figure`` (no pyplot): no global state, no GUI backend, safe in
worker threads and under pytest.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Level = Literal["info", "warn", "error", "ok"]

CSS = """
:root { --fg:#1d2127; --muted:#5f6b7a; --line:#d9dee5; --bg:#ffffff; --soft:#f5f7fa;
        --warn:#fff4e0; --warnline:#e69a1c; --error:#fde8e8; --errorline:#d64545;
        --ok:#e8f6ec; --okline:#2f9e57; --info:#e8f1fd; --infoline:#3b7bd6; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1180px; padding: 24px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; }
.subtitle { color: var(--muted); margin-bottom: 18px; }
.callout { border-left: 5px solid var(--infoline); background: var(--info); padding: 10px 14px;
           margin: 10px 0; border-radius: 4px; }
.callout.warn { border-color: var(--warnline); background: var(--warn); }
.callout.error { border-color: var(--errorline); background: var(--error); }
.callout.ok { border-color: var(--okline); background: var(--ok); }
table.data { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
table.data th, table.data td { border: 1px solid var(--line); padding: 4px 9px; text-align: left; }
table.data th { background: var(--soft); font-weight: 600; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figure { margin: 8px 0 18px; }
.figure img { max-width: 100%; height: auto; }
.caption { color: var(--muted); font-size: 12px; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 18px; }
.gallery figure { margin: 0; width: 132px; }
.gallery img { width: 128px; height: 128px; object-fit: contain; background: #000; border: 1px solid var(--line); }
.gallery figcaption { font-size: 11px; color: var(--muted); word-break: break-all; }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0 16px; }
.kv div:nth-child(odd) { color: var(--muted); }
code { background: var(--soft); padding: 1px 4px; border-radius: 3px; }
"""


def esc(value: Any) -> str:
    """HTML-escape any value's ``str()`` (quotes included)."""
    return html.escape(str(value), quote=True)


# ------------------------------------------------------------------------------------------- images


def new_figure(width: float = 6.0, height: float = 3.5, nrows: int = 1, ncols: int = 1, **subplots: Any):
    """A pyplot-free matplotlib Figure and its axes (``fig.subplots(nrows, ncols, **subplots)``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, **subplots)
    return fig, axes


def fig_to_png_b64(fig: Any, dpi: int = 100) -> str:
    """Render a matplotlib figure to base64 PNG text (the figure is not kept open: it was never in pyplot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def array_to_png_b64(img: np.ndarray, max_side: int | None = None) -> str:
    """Encode a 2-D (gray) or HxWx3 (RGB) array as base64 PNG, optionally shrunk to ``max_side`` px.

    Float arrays are taken as 0..1; other integer types are min-max scaled to 8 bits.
    """
    import cv2

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if np.issubdtype(np.asarray(img).dtype, np.floating) and a.max(initial=0) <= 1.0:
            a = a * 255.0
        else:
            lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0
        a = np.clip(a, 0, 255).astype(np.uint8)
    if max_side and max(a.shape[:2]) > max_side:
        s = max_side / max(a.shape[:2])
        a = cv2.resize(a, (max(1, round(a.shape[1] * s)), max(1, round(a.shape[0] * s))), interpolation=cv2.INTER_AREA)
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", a)
    if not ok:
        raise ValueError(f"could not PNG-encode an array of shape {a.shape}")
    return base64.b64encode(data.tobytes()).decode("ascii")


def img_tag(b64_png: str, alt: str = "", width: int | None = None, title: str | None = None) -> str:
    """``<img>`` with an embedded PNG."""
    w = f' width="{int(width)}"' if width else ""
    t = f' title="{esc(title)}"' if title else ""
    return f'<img src="data:image/png;base64,{b64_png}" alt="{esc(alt)}"{w}{t}>'


def figure_tag(fig: Any, caption: str | None = None, dpi: int = 100, alt: str = "figure") -> str:
    """A matplotlib figure as an embedded image block with an optional caption."""
    cap = f'<div class="caption">{esc(caption)}</div>' if caption else ""
    return f'<div class="figure">{img_tag(fig_to_png_b64(fig, dpi), alt=alt)}{cap}</div>'


def gallery(items: Iterable[tuple[str, str]]) -> str:
    """Thumbnails in a wrapping grid: ``items`` are (base64 PNG, caption) pairs."""
    cells = [
        f"<figure>{img_tag(b64, alt=cap, title=cap)}<figcaption>{esc(cap)}</figcaption></figure>" for b64, cap in items
    ]
    return f'<div class="gallery">{"".join(cells)}</div>' if cells else '<p class="caption">(none)</p>'


# ------------------------------------------------------------------------------------------- blocks


def _fmt(v: Any, float_fmt: str) -> tuple[str, bool]:
    if isinstance(v, bool | np.bool_):
        return ("yes" if v else "no"), False
    if isinstance(v, int | np.integer):
        return f"{int(v):,}", True
    if isinstance(v, float | np.floating):
        if math.isnan(float(v)):
            return "", True
        return float_fmt.format(float(v)), True
    return esc(v), False


def table(
    rows: Any,
    columns: Sequence[str] | None = None,
    float_fmt: str = "{:.3g}",
    index: bool = False,
    max_rows: int | None = None,
) -> str:
    """An HTML table from a DataFrame, a list of dicts or a list of sequences (with ``columns``).

    Cells are escaped; numbers are right-aligned and formatted (floats with ``float_fmt``). ``max_rows`` cuts
    long tables and says how many rows were left out.
    """
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        df = rows.reset_index() if index else rows
    elif isinstance(rows, Mapping):
        df = pd.DataFrame(list(rows.items()), columns=list(columns or ["key", "value"]))
    else:
        df = pd.DataFrame(list(rows), columns=list(columns) if columns else None)
    if columns is not None and isinstance(rows, pd.DataFrame):
        df = df[list(columns)]
    total = len(df)
    if max_rows is not None and total > max_rows:
        df = df.head(max_rows)
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = []
    for rec in df.itertuples(index=False):
        cells = []
        for v in rec:
            text, num = _fmt(v, float_fmt)
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="caption">{total - len(df):,} more rows not shown</p>' if total > len(df) else ""
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{more}'


def kv(pairs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """A two-column key/value list."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return '<div class="kv">' + "".join(f"<div>{esc(k)}</div><div>{esc(v)}</div>" for k, v in items) + "</div>"


def callout(text: str, level: Level = "info", title: str | None = None) -> str:
    """A highlighted box (``info``, ``warn``, ``error`` or ``ok``); ``text`` is escaped."""
    t = f"<strong>{esc(title)}</strong> " if title else ""
    return f'<div class="callout {level}">{t}{esc(text)}</div>'


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def section(title: str, *parts: str, anchor: str | None = None, level: int = 2) -> str:
    """A headed section; ``parts`` are HTML fragments built with the helpers above."""
    a = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{a}><h{level}>{esc(title)}</h{level}>{''.join(parts)}</section>"


def page(title: str, body: Sequence[str] | str, subtitle: str | None = None) -> str:
    """A complete HTML document (UTF-8, inline CSS, no scripts or external resources)."""
    content = body if isinstance(body, str) else "\n".join(body)
    sub = f'<div class="subtitle">{esc(subtitle)}</div>' if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{esc(title)}</h1>{sub}\n{content}\n</body></html>\n"
    )


def write_page(path: str | Path, html_text: str) -> Path:
    """Write ``html_text`` (from :func:`page`) to ``path`` as UTF-8; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(html_text, encoding="utf-8")
    return p
