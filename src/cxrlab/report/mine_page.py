"""The similar-image mining gallery (``gallery.html`` of ``cxrlab mine``): self-contained, thumbnails inlined."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd


def _thumb_uri(path: str, size: int) -> str:
    import cv2

    from cxrlab.data.io import read_xray

    try:
        g = read_xray(path)
    except Exception:
        return ""
    h, w = g.shape
    s = size / max(h, w)
    g = cv2.resize(g, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1d232b}
.q{display:flex;gap:10px;align-items:flex-start;border-top:1px solid #d9dee5;padding:10px 0;flex-wrap:wrap}
figure{margin:0;width:132px;font-size:12px}figure img{display:block;max-width:128px;max-height:128px}
figure.err{outline:3px solid #c62828;outline-offset:2px}.muted{color:#5b6675}figcaption{word-break:break-all}
"""


def write_mine_page(
    path: Path,
    rows_q: list[dict[str, Any]],
    table: pd.DataFrame,
    *,
    base: Path,
    pool: Path,
    k: int,
    images: Path | None,
    thumb: int,
) -> None:
    """The self-contained gallery: each query image with its ``k`` nearest pool images and their distances."""
    from cxrlab import RESEARCH_NOTICE

    e = html.escape
    by_q = {k: g.sort_values("rank") for k, g in table.groupby("query")} if len(table) else {}
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cxrlab mine</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Similar pool images for {len(rows_q)} {'errors' if images is None else 'images'}</h1>",
        f"<p class='muted'>run {e(str(base))} · pool {e(str(pool))} · k={k} · cosine distance of "
        f"penultimate-layer embeddings (0 = identical direction) · {e(RESEARCH_NOTICE)}</p>",
    ]
    for r in rows_q:
        cap = f"{e(Path(r['query']).name)}<br>label {e(r['label'] or '?')} → pred {e(r['prediction'])} "
        cap += f"({r['confidence']:.2f})"
        parts.append(f"<div class='q'><figure class='err'><img src='{_thumb_uri(r['query'], thumb)}' alt='query'>")
        parts.append(f"<figcaption>{cap}</figcaption></figure>")
        for _, n in by_q.get(r["query"], pd.DataFrame()).iterrows():
            parts.append(
                f"<figure><img src='{_thumb_uri(n['path'], thumb)}' alt='neighbour {int(n['rank'])}'>"
                f"<figcaption>#{int(n['rank'])} d={n['distance']:.3f}<br>{e(Path(n['path']).name)}"
                "</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    path.write_text("".join(parts), encoding="utf-8")
