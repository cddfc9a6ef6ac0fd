"""The similar-image mining gallery (``gallery.html`` of ``cxrlab mine``): self-contained, thumbnails inlined."""

from __future__ import annotations

import base64
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
    from cxrlab.report import html as rh

    by_q = {k: g.sort_values("rank") for k, g in table.groupby("query")} if len(table) else {}
    queries = []
    for r in rows_q:
        near = by_q.get(r["query"], pd.DataFrame())
        queries.append(
            {
                "thumb": _thumb_uri(r["query"], thumb),
                "name": Path(r["query"]).name,
                "label": r["label"] or "?",
                "prediction": r["prediction"],
                "confidence": f"{r['confidence']:.2f}",
                "neighbours": [
                    {
                        "thumb": _thumb_uri(n["path"], thumb),
                        "rank": int(n["rank"]),
                        "distance": f"{n['distance']:.3f}",
                        "name": Path(n["path"]).name,
                    }
                    for _, n in near.iterrows()
                ],
            }
        )
    html = rh.render(
        "mine.html",
        heading=f"Similar pool images for {len(rows_q)} {'errors' if images is None else 'images'}",
        run=str(base),
        pool=str(pool),
        k=k,
        notice=RESEARCH_NOTICE,
        queries=queries,
    )
    path.write_text(html, encoding="utf-8")
