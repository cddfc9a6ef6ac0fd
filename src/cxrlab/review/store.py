"""Where review answers live: one table in a real database (SQLAlchemy Core).

SQLite under the run (``<run>/review/review.db``) by default; ``postgresql://user:pass@host/db`` for a team. One
row per (run, image, reader): a reader who answers an image again replaces their own answer (so a page reload or
a second pass never duplicates it), while two readers on one image are two rows, both kept.

Columns (also the export CSV's, in this order): see :data:`ANSWER_COLUMNS`. ``region`` is a JSON list of boxes
``[x0, y0, x1, y1]`` in [0, 1] of the model input (the geometry the Grad-CAM overlay is drawn in); a click is a
small box.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from cxrlab.config import StrictModel
from cxrlab.errors import CxrlabError

DB_FILE = "review.db"
TABLE = "review_answers"
LOCALISATION = ("yes", "partly", "no")
ANSWER_COLUMNS = [
    "run_id",
    "split",
    "image",  # the image's path as in the explain table (the key, with run_id and reader)
    "reader",
    "label",  # the dataset label shown to the reader
    "prediction",
    "confidence",
    "label_ok",  # 1 = the label is right, 0 = wrong, empty = not answered
    "corrected_label",  # the reader's label when label_ok = 0 (may be empty: wrong, but no better class)
    "localisation",  # yes | partly | no: the highlighted region holds the decisive finding
    "region",  # JSON list of [x0, y0, x1, y1] boxes in [0, 1] of the model input
    "note",
    "answered_at",  # UTC ISO 8601
]


class ReviewError(CxrlabError):
    """The review cannot proceed; the message names the path or value and what to do."""


class Answer(StrictModel):
    """One reader's answer on one image (what the page sends)."""

    reader: str = Field(min_length=1, max_length=100, description="who answers (name or initials)")
    label_ok: bool | None = Field(None, description="is the dataset label right?")
    corrected_label: str | None = Field(None, max_length=200, description="the right class when label_ok is false")
    localisation: Literal["yes", "partly", "no"] | None = Field(
        None, description="does the highlighted region contain the decisive finding?"
    )
    region: list[tuple[float, float, float, float]] = Field(
        default_factory=list, max_length=50, description="decisive region(s): [x0, y0, x1, y1] in [0, 1]"
    )
    note: str = Field("", max_length=5000)

    @field_validator("reader")
    @classmethod
    def _reader(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("reader must not be blank")
        return v

    @field_validator("region")
    @classmethod
    def _boxes(cls, v: list[tuple[float, float, float, float]]) -> list[tuple[float, float, float, float]]:
        out = []
        for b in v:
            if not all(math.isfinite(c) and 0 <= c <= 1 for c in b):
                raise ValueError(f"region box {list(b)} must have 4 coordinates in [0, 1]")
            x0, y0, x1, y1 = b
            out.append((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        return out


@dataclass(frozen=True)
class ItemInfo:
    """What the store records about the image beside the answer (a snapshot of what the reader saw)."""

    run_id: str
    split: str
    image: str
    label: str
    prediction: str
    confidence: float


def default_db_url(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'review' / DB_FILE).resolve()}"


def normalise_url(db: str | Path, run_dir: Path | None = None) -> str:
    """``--db`` value -> SQLAlchemy URL: a URL is kept (``postgresql://`` gets the installed driver), a plain path
    becomes a SQLite file URL, empty means the run's default."""
    s = str(db or "").strip()
    if not s:
        if run_dir is None:
            raise ReviewError("no database: pass --db sqlite:///PATH or postgresql://...")
        return default_db_url(run_dir)
    if "://" not in s:
        return f"sqlite:///{Path(s).expanduser().resolve()}"
    scheme, rest = s.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; name whichever driver is installed (as sweep does)
        import importlib.util

        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{driver}://{rest}"
        return f"postgresql://{rest}"
    return s


def _first_line(e: BaseException) -> str:
    """``type: message`` of a database error, its first line (SQLAlchemy appends driver details and a link)."""
    inner = getattr(e, "orig", None) or e
    text = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {text}"


def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


class ReviewStore:
    """The answers table behind ``url`` (created when missing)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") :])
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ReviewError(f"cannot create the review database folder {path.parent}: {e.strerror}") from None
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
        if not url.startswith("sqlite"):
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(url, **kwargs)
        except Exception as e:  # bad URL, missing driver
            raise ReviewError(f"cannot open review database {redact(url)}: {e}") from None
        md = sa.MetaData()
        self.table = sa.Table(
            TABLE,
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.String(200), nullable=False),
            sa.Column("split", sa.String(50), nullable=False),
            sa.Column("image", sa.String(2000), nullable=False),
            sa.Column("reader", sa.String(100), nullable=False),
            sa.Column("label", sa.String(200), nullable=False),
            sa.Column("prediction", sa.String(200), nullable=False),
            sa.Column("confidence", sa.Float, nullable=False),
            sa.Column("label_ok", sa.Boolean, nullable=True),
            sa.Column("corrected_label", sa.String(200), nullable=True),
            sa.Column("localisation", sa.String(10), nullable=True),
            sa.Column("region", sa.Text, nullable=False, default="[]"),
            sa.Column("note", sa.Text, nullable=False, default=""),
            sa.Column("answered_at", sa.String(40), nullable=False),
            sa.UniqueConstraint("run_id", "image", "reader", name="uq_review_run_image_reader"),
        )
        try:
            md.create_all(self.engine)
        except Exception as e:
            raise ReviewError(
                f"cannot open review database {redact(url)}: {_first_line(e)}. Check the URL, that the "
                "server is running and the user may create tables (or that the SQLite folder is writable)"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------------------------------------- writing

    def save(self, item: ItemInfo, answer: Answer, answered_at: str | None = None) -> None:
        """Insert or replace ``answer.reader``'s answer on ``item`` (one row per run, image and reader)."""
        import sqlalchemy as sa

        row = {
            "run_id": item.run_id,
            "split": item.split,
            "image": item.image,
            "reader": answer.reader,
            "label": item.label,
            "prediction": item.prediction,
            "confidence": float(item.confidence),
            "label_ok": answer.label_ok,
            "corrected_label": (answer.corrected_label or None) if answer.label_ok is False else None,
            "localisation": answer.localisation,
            "region": json.dumps([[round(c, 5) for c in b] for b in answer.region]),
            "note": answer.note,
            "answered_at": answered_at or datetime.now(UTC).isoformat(timespec="seconds"),
        }
        t = self.table
        key = (t.c.run_id == item.run_id) & (t.c.image == item.image) & (t.c.reader == answer.reader)
        for attempt in range(2):
            try:
                with self.engine.begin() as con:
                    n = con.execute(sa.update(t).where(key).values(**row)).rowcount
                    if n == 0:
                        con.execute(sa.insert(t).values(**row))
                return
            except sa.exc.IntegrityError:  # another request inserted the same key in between: update it
                if attempt:
                    raise

    # ---------------------------------------------------------------------------------------------- reading

    def answers(self, run_id: str | None = None, reader: str | None = None) -> list[dict[str, Any]]:
        """Rows as dicts with :data:`ANSWER_COLUMNS` (``region`` decoded), ordered by run, image, reader."""
        import sqlalchemy as sa

        t = self.table
        q = sa.select(*[t.c[c] for c in ANSWER_COLUMNS]).order_by(t.c.run_id, t.c.image, t.c.reader)
        if run_id is not None:
            q = q.where(t.c.run_id == run_id)
        if reader is not None:
            q = q.where(t.c.reader == reader)
        with self.engine.connect() as con:
            rows = [dict(r._mapping) for r in con.execute(q)]
        for r in rows:
            r["region"] = json.loads(r["region"] or "[]")
        return rows

    def count(self, run_id: str | None = None) -> int:
        return len(self.answers(run_id))


# --------------------------------------------------------------------------------------------- CSV in/out


def _csv_value(col: str, v: Any) -> Any:
    if v is None:
        return ""
    if col == "label_ok":
        return int(bool(v))
    if col == "region":
        return json.dumps(v)
    return v


def export_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write answers (from :meth:`ReviewStore.answers`) as CSV with :data:`ANSWER_COLUMNS`."""
    import pandas as pd

    from cxrlab.atomic import atomic_open

    df = pd.DataFrame([{c: _csv_value(c, r.get(c)) for c in ANSWER_COLUMNS} for r in rows], columns=ANSWER_COLUMNS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as f:
        df.to_csv(f, index=False, float_format="%.6g")
    return path


def read_answers_csv(path: Path) -> list[tuple[ItemInfo, Answer, str]]:
    """An export CSV -> (item, answer, answered_at) triples for :meth:`ReviewStore.save` (the round trip)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"answers file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise ReviewError(f"{path} is not a readable CSV ({e}); pass a file written by `cxrlab review --export`") from e
    missing = [c for c in ANSWER_COLUMNS if c not in df.columns]
    if missing:
        raise ReviewError(
            f"{path} lacks the column(s) {', '.join(missing)}; pass a file written by `cxrlab review --export`"
        )
    out = []
    for i, r in df.iterrows():
        try:
            item = ItemInfo(
                run_id=r["run_id"],
                split=r["split"],
                image=r["image"],
                label=r["label"],
                prediction=r["prediction"],
                confidence=float(r["confidence"]),
            )
            ok = {"1": True, "0": False, "": None, "true": True, "false": False}[r["label_ok"].strip().lower()]
            ans = Answer(
                reader=r["reader"],
                label_ok=ok,
                corrected_label=r["corrected_label"] or None,
                localisation=r["localisation"] or None,
                region=json.loads(r["region"] or "[]"),
                note=r["note"],
            )
        except Exception as e:
            raise ReviewError(f"{path}, row {int(i) + 2}: {e}".splitlines()[0]) from None
        out.append((item, ans, r["answered_at"]))
    return out
