"""The page layer's shared pieces: Jinja2 rendering of the page templates and the values they show.

Every page of cxrlab is a Jinja2 template in ``cxrlab/report/templates`` (autoescape on: every string from the
data, such as a file, class or source name, is escaped by the template); the Python side only computes a
context dict. Pages are self-contained: CSS is inline, figures and thumbnails are embedded as base64 PNG
``<img>`` tags, and there are no CDN links, so a page opens offline, can be mailed or attached to a W&B run, and
never changes after it is written.

Typical use::

    from cxrlab.report import html as rh

    fig, ax = rh.new_figure(6, 3)
    ax.bar(["a", "b"], [3, 5])
    rh.write_page(path, rh.render("my_page.html", title="My report", counts=rh.figure(fig), rows=rh.table(df)))

with ``templates/my_page.html`` extending ``page.html`` and drawing its blocks with the macros of
``macros.html`` (``m.table(rows)``, ``m.figure(counts)``, ``m.callout(...)``, ``m.section(...)``).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot): no global state, no GUI backend, safe in
worker threads and under pytest.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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


# ------------------------------------------------------------------------------------------- context


class Png(NamedTuple):
    """An embedded PNG for the ``figure`` macro."""

    b64: str
    alt: str
    caption: str = ""


class Cell(NamedTuple):
    """A table cell: its text, right-aligned when numeric, with an optional confidence interval after it."""

    text: str
    num: bool = False
    ci: str = ""


class Table(NamedTuple):
    """What the ``table`` macro draws: header, rows of cells, and how many rows were cut."""

    columns: list[str]
    rows: list[list[Cell]]
    more: int = 0


def figure(fig: Any, caption: str | None = None, dpi: int = 100, alt: str = "figure") -> Png:
    """A matplotlib figure as PNG for the ``figure`` macro."""
    return Png(fig_to_png_b64(fig, dpi), alt, caption or "")


def png_file(path: str | Path, alt: str, caption: str = "") -> Png | None:
    """A PNG file for the ``figure`` macro; None (nothing drawn) when the file is missing."""
    p = Path(path)
    if not p.is_file():
        return None
    return Png(base64.b64encode(p.read_bytes()).decode("ascii"), alt, caption)


def cell(v: Any, float_fmt: str = "{:.3g}") -> Cell:
    """A value as a table cell: numbers formatted and right-aligned, booleans as yes/no, NaN as empty."""
    if isinstance(v, Cell):
        return v
    if isinstance(v, bool | np.bool_):
        return Cell("yes" if v else "no")
    if isinstance(v, int | np.integer):
        return Cell(f"{int(v):,}", True)
    if isinstance(v, float | np.floating):
        return Cell("" if math.isnan(float(v)) else float_fmt.format(float(v)), True)
    return Cell(str(v))


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; an en dash for None, NaN or infinity."""
    if x is None:
        return "–"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(f):
        return "–"
    return f"{f:.{digits}f}"


def fmt_ci(ci: Any, digits: int = 3) -> str:
    """``[lo, hi]``; empty when either end is missing or not finite."""
    if not ci or any(v is None or not math.isfinite(float(v)) for v in ci):
        return ""
    return f"[{float(ci[0]):.{digits}f}, {float(ci[1]):.{digits}f}]"


def ci_cell(value: Any, ci: Any = None, digits: int = 3, ci_digits: int | None = None) -> Cell:
    """A value with its confidence interval, for the ``table`` macro (drawn as ``value [lo, hi]``)."""
    return Cell(fmt(value, digits), False, fmt_ci(ci, digits if ci_digits is None else ci_digits))


def table(
    rows: Any,
    columns: Sequence[str] | None = None,
    float_fmt: str = "{:.3g}",
    index: bool = False,
    max_rows: int | None = None,
) -> Table:
    """A table from a DataFrame, a list of dicts or a list of sequences (with ``columns``), for the ``table`` macro.

    Numbers are right-aligned and formatted (floats with ``float_fmt``); :class:`Cell` values pass as they are.
    ``max_rows`` cuts long tables and the macro says how many rows were left out.
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
    body = [[cell(v, float_fmt) for v in rec] for rec in df.itertuples(index=False)]
    return Table([str(c) for c in df.columns], body, total - len(df))


def pairs(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Key/value pairs for the ``kv`` macro."""
    return list(items.items() if isinstance(items, Mapping) else items)


# ------------------------------------------------------------------------------------------- render


@functools.cache
def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cxrlab.report", "templates"),
        autoescape=True,  # every value is escaped unless it is Markup (the CSS/JS assets, plotly's own HTML)
        undefined=jinja2.StrictUndefined,  # a misspelt context key fails the page instead of drawing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals["asset"] = asset
    env.filters["count"] = lambda n: f"{int(n):,}"
    return env


def asset(name: str) -> Any:
    """A file of ``cxrlab/report/templates`` (CSS, JavaScript) as trusted text, to inline into a page."""
    from markupsafe import Markup

    env = _templates()
    return Markup(env.loader.get_source(env, name)[0])


def render(template: str, **context: Any) -> str:
    """A page from ``templates/<template>`` and its context (values escaped by the template)."""
    return _templates().get_template(template).render(**context)


def trusted(html_text: str) -> Any:
    """HTML made by a library (plotly's chart divs), inserted unescaped: never pass a string from the data."""
    from markupsafe import Markup

    return Markup(html_text)


def write_page(path: str | Path, html_text: str) -> Path:
    """Write ``html_text`` (from :func:`render`) to ``path`` as UTF-8; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(html_text, encoding="utf-8")
    return p
