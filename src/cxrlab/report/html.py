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
import functools
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Level = Literal["info", "warn", "error", "ok"]


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


@functools.cache
def _templates() -> Any:
    import jinja2

    # autoescape off: every value is escaped with esc() or is a fragment built by the helpers above
    return jinja2.Environment(
        loader=jinja2.PackageLoader("cxrlab.report", "templates"), autoescape=False, keep_trailing_newline=True
    )


def asset(name: str) -> str:
    """A file of ``cxrlab/report/templates`` (CSS, JavaScript) as text, to inline into a self-contained page."""
    env = _templates()
    return env.loader.get_source(env, name)[0]


def page(title: str, body: Sequence[str] | str, subtitle: str | None = None) -> str:
    """A complete HTML document (UTF-8, inline CSS, no external resources) from ``templates/page.html``."""
    content = body if isinstance(body, str) else "\n".join(body)
    sub = f'<div class="subtitle">{esc(subtitle)}</div>' if subtitle else ""
    return (
        _templates()
        .get_template("page.html")
        .render(title=esc(title), css=asset("report.css"), subtitle=sub, content=content)
    )


def write_page(path: str | Path, html_text: str) -> Path:
    """Write ``html_text`` (from :func:`page`) to ``path`` as UTF-8; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(html_text, encoding="utf-8")
    return p
