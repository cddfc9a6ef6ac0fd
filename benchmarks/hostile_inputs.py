"""Hostile inputs through every door: one folder of bad files run through ``cxrlab data ingest``, ``cxrlab predict``
and ``cxrlab serve`` (FastAPI's TestClient), printed as one table of verdicts.

The folder holds, besides good images: a corrupt PNG, a truncated JPEG, text saved as .png, a zero-byte file, a
16-bit PNG, RGBA, palette and CMYK images, a decompression bomb (a PNG header claiming 50,000 x 50,000 pixels), a
DICOM radiograph with pixels (pydicom-data's RG1_UNCR.dcm) and the same without pixel data, a symlink loop, a
dangling link, a symlinked folder, a folder symlink back to its parent, a file whose name is not valid UTF-8,
nested folders, a hidden file (.DS_Store) and a README.

Every file must be accounted for by all three (an entry in ingest's manifest / rejects / ignored list, a row or an
``ignored`` entry in predict's JSON, an HTTP answer from serve), the three must agree on whether it is a usable
image, and no output may hold a Python traceback. One difference is by design and shown as ``name``: ingest
refuses a file name that is not valid UTF-8 (its manifest is UTF-8 text and later stages could not name the file),
while predict and serve, which only report it, classify its pixels.

Run: ``.venv/bin/python benchmarks/hostile_inputs.py [--out DIR] [--bundle BUNDLE]``; exits 1 when a file is
missing from a tool, the verdicts disagree or a traceback appears. Without ``--bundle`` an untrained bundle of
timm's tiny test model is made (the verdicts are about inputs, not accuracy).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BAD_NAME = os.fsdecode(b"bad\xff\xfe.png")
CLI = "import sys; from cxrlab.cli import main; sys.exit(main())"


# --------------------------------------------------------------------------------------------- the folder


def _png(arr, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few-byte PNG whose (valid) header claims ``width x height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def build_folder(root: Path) -> dict[str, str]:
    """Write the hostile folder under ``root`` (class folders NORMAL/ and PNEUMONIA/, a folder outside them that
    one of them links to); returns {relative path: what it is}."""
    import numpy as np
    from PIL import Image

    from cxrlab.data.synth import make_phantom

    rng = np.random.default_rng(0)
    gray = make_phantom("NORMAL", rng, size=160)
    img = Image.fromarray(gray)
    src, outside = root / "src", root / "outside"
    normal, pneu = src / "NORMAL", src / "PNEUMONIA"
    for d in (normal / "a" / "b" / "c", pneu, outside):
        d.mkdir(parents=True, exist_ok=True)
    what: dict[str, str] = {}

    def put(rel: str, data: bytes, desc: str) -> None:
        p = src / rel
        p.write_bytes(data)
        what[rel] = desc

    put("NORMAL/good.png", _png(img), "good 8-bit PNG")
    put("NORMAL/good.jpg", _jpeg(img), "good JPEG")
    put("NORMAL/a/b/c/nested.png", _png(img.rotate(3)), "good PNG three folders deep")
    put("NORMAL/sixteen.png", _png(Image.fromarray(gray.astype(np.uint16) * 257)), "16-bit PNG")
    put("NORMAL/rgba.png", _png(img.convert("RGBA")), "RGBA PNG")
    put("NORMAL/palette.png", _png(img.convert("P")), "palette PNG")
    put("NORMAL/cmyk.jpg", _jpeg(img.convert("CMYK")), "CMYK JPEG")
    put(
        "NORMAL/corrupt.png", b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(), "corrupt PNG"
    )
    jpg = _jpeg(img)
    put("NORMAL/truncated.jpg", jpg[: len(jpg) // 2], "truncated JPEG")
    put("NORMAL/text.png", b"this is a text file, not an image\n" * 4, "text saved as .png")
    put("NORMAL/zero.png", b"", "zero-byte file")
    put("NORMAL/bomb.png", bomb_png(), "decompression bomb (50,000 x 50,000 header)")
    put("NORMAL/README.txt", b"notes\n", "a README (not an image)")
    put("NORMAL/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64), "hidden file (Finder metadata)")
    put(f"NORMAL/{BAD_NAME}", _png(img.rotate(-3)), "good PNG, name not valid UTF-8")
    put("PNEUMONIA/p1.png", _png(img.rotate(5)), "good PNG")
    put("PNEUMONIA/p2.jpg", _jpeg(img.rotate(-5)), "good JPEG")
    try:
        import pydicom
        from pydicom.data import get_testdata_file

        dcm = Path(get_testdata_file("RG1_UNCR.dcm"))
        put("NORMAL/radiograph.dcm", dcm.read_bytes(), "DICOM radiograph (pydicom-data RG1_UNCR)")
        ds = pydicom.dcmread(dcm)
        del ds.PixelData
        buf = io.BytesIO()
        ds.save_as(buf)
        put("NORMAL/no-pixels.dcm", buf.getvalue(), "DICOM without pixel data")
    except ImportError:
        print("pydicom-data not installed: the DICOM cases are left out (pip install pydicom-data)", file=sys.stderr)
    (outside / "linked.png").write_bytes(_png(img.rotate(7)))
    (normal / "linked").symlink_to(outside, target_is_directory=True)
    what["NORMAL/linked/linked.png"] = "good PNG inside a symlinked folder"
    (normal / "again").symlink_to(normal, target_is_directory=True)
    what["NORMAL/again"] = "folder symlink back to its parent (a loop)"
    (normal / "loop.png").symlink_to(normal / "loop.png")
    what["NORMAL/loop.png"] = "symlink loop (points to itself)"
    (normal / "dangling.png").symlink_to(root / "missing.png")
    what["NORMAL/dangling.png"] = "dangling symlink"
    return what


def tiny_bundle(out: Path) -> Path:
    import timm
    import torch

    from cxrlab.inference.bundle import BundleMeta, save_bundle
    from cxrlab.transforms import norm_constants

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2, in_chans=3)
    mean, std = norm_constants(3)
    meta = BundleMeta("test_efficientnet", ["NORMAL", "PNEUMONIA"], (64, 64), 3, mean, std, dataset_version="hostile")
    return save_bundle(model, meta, out)


# ---------------------------------------------------------------------------------------------- the tools


@dataclass
class Verdict:
    ok: bool | None  # True: a usable image; False: refused; None: not reported (a defect)
    text: str


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[dict]:
        return [r for r in self.rows if any(r[t].ok is None for t in ("ingest", "predict", "serve"))]

    @property
    def disagree(self) -> list[dict]:
        return [r for r in self.rows if r["agree"] == "NO"]


def _cli(args: list[str], log: Path) -> int:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "200"}
    env.pop("CXRLAB_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env, timeout=600)
    log.write_text(f"$ cxrlab {' '.join(args)}\nexit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r.returncode


def run_ingest(src: Path, out: Path, logs: Path) -> dict[str, Verdict]:
    import csv

    rc = _cli(["data", "ingest", str(src), "--out", str(out), "--no-progress", "--workers", "2"], logs / "ingest.log")
    got: dict[str, Verdict] = {}
    if rc not in (0, 2) or not (out / "manifest.csv").is_file():
        return got
    for r in csv.DictReader((out / "manifest.csv").open(encoding="utf-8")):
        got[r["path"]] = Verdict(True, f"image ({r['label']}, {r['mode']} {r['bit_depth']}-bit)")
    for r in csv.DictReader((out / "rejects.csv").open(encoding="utf-8")):
        got[r["path"]] = Verdict(False, f"reject {r['kind']}: {r['reason']}")
    for r in json.loads((out / "ingest.json").read_text())["ignored"]:
        got[r["path"]] = Verdict(False, f"ignored: {r['reason']}")
    return got


def run_predict(bundle: Path, src: Path, out: Path, logs: Path) -> dict[str, Verdict]:
    path = out / "predict.json"
    _cli(["predict", str(bundle), str(src), "-f", "json", "-o", str(path), "--device", "cpu"], logs / "predict.log")
    got: dict[str, Verdict] = {}
    if not path.is_file():
        return got
    doc = json.loads(path.read_text(encoding="utf-8"))
    for p in doc["predictions"]:
        got[p["path"]] = Verdict(True, f"label {p['label']}") if p["error"] is None else Verdict(False, p["error"])
    for p in doc["ignored"]:
        got[p["path"]] = Verdict(False, f"ignored: {p['reason']}")
    return got


def run_serve(bundle: Path, paths: list[Path], logs: Path) -> dict[str, Verdict]:
    from fastapi.testclient import TestClient

    from cxrlab.data.walk import display_path
    from cxrlab.serve.app import ServeSettings, create_app

    got: dict[str, Verdict] = {}
    lines = []
    with TestClient(create_app(bundle, ServeSettings(device="cpu")), raise_server_exceptions=False) as client:
        for p in paths:
            key = display_path(p)
            if p.is_dir():
                got[key] = Verdict(False, "folder: nothing to upload")
                continue
            try:
                data = p.read_bytes()
            except OSError as e:
                got[key] = Verdict(False, f"nothing to upload: {e.strerror}")
                continue
            name = display_path(p.name)
            r = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"raw": r.text}
            lines.append(f"{key}: {r.status_code} {json.dumps(body)[:300]}")
            if r.status_code == 200:
                got[key] = Verdict(True, f"200 label {body['label']}")
            else:
                got[key] = Verdict(False, f"{r.status_code} {body.get('detail', body)}")
                if r.status_code >= 500:
                    lines.append(f"SERVER ERROR for {key}")
    (logs / "serve.log").write_text("\n".join(lines) + "\n")
    return got


# ---------------------------------------------------------------------------------------------- the table


def run(out: Path, bundle: Path | None = None) -> Report:
    from cxrlab.data.walk import display_path

    if out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True)
    what = build_folder(out / "folder")
    src = out / "folder" / "src"
    bundle = bundle or tiny_bundle(out / "bundle")

    ingest = run_ingest(src, out / "ingest", logs)
    predict = run_predict(bundle, src, out, logs)
    # every name on disk (symlinks not followed) plus whatever a tool reported (files inside a symlinked folder)
    names = {display_path(Path(d) / f) for d, _, files in os.walk(src) for f in files}
    names |= set(ingest) | set(predict)
    paths = {display_path(p): p for p in (Path(d) / f for d, _, files in os.walk(src) for f in files)}
    for n in names - set(paths):  # reported names: map back to a path on disk (display == real for UTF-8 names)
        paths[n] = Path(n)
    serve = run_serve(bundle, [paths[n] for n in sorted(names)], logs)

    report = Report()
    for n in sorted(names):
        rel = os.path.relpath(n, display_path(src))
        v = {
            t: d.get(n, Verdict(None, "NOT REPORTED"))
            for t, d in (("ingest", ingest), ("predict", predict), ("serve", serve))
        }
        oks = {x.ok for x in v.values()}
        if None in oks:
            agree = "NO"
        elif len(oks) == 1:
            agree = "yes"
        elif v["ingest"].text.startswith("reject bad_name") and v["predict"].ok and v["serve"].ok:
            agree = "name"
        else:
            agree = "NO"
        report.rows.append(
            {"file": rel, "what": what.get(rel.replace(display_path(BAD_NAME), BAD_NAME), ""), **v, "agree": agree}
        )

    for f in sorted(out.rglob("*")):
        if f.is_file() and not f.is_symlink() and "folder" not in f.relative_to(out).parts[:1]:
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if "Traceback" in text or "SERVER ERROR" in text:
                report.tracebacks.append(str(f))
    return report


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="hostile inputs: verdict of each tool", title_justify="left", show_lines=False)
    for col in ("file", "what", "ingest", "predict", "serve", "agree"):
        t.add_column(col, overflow="fold", max_width=None if col in ("file", "agree") else 46)
    for r in report.rows:
        cells = [f"[{'green' if r[k].ok else 'red'}]{r[k].text}[/]" for k in ("ingest", "predict", "serve")]
        t.add_row(r["file"], r["what"], *cells, r["agree"])
    console = Console(width=max(Console().width, 220))
    console.print(t)
    n = len(report.rows)
    same = sum(r["agree"] == "yes" for r in report.rows)
    by_name = sum(r["agree"] == "name" for r in report.rows)
    console.print(
        f"{n} files; accounted for by all three: {n - len(report.missing)}; same verdict: {same}"
        + (f" (+{by_name} refused by ingest for its non-UTF-8 name only)" if by_name else "")
        + f"; disagreements: {len(report.disagree)}; outputs with a traceback: {len(report.tracebacks)}"
    )
    for f in report.tracebacks:
        console.print(f"[red]traceback in {f}[/]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder, removed at the end)")
    ap.add_argument("--bundle", type=Path, default=None, help="model bundle (default: an untrained tiny one)")
    args = ap.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="cxrlab-hostile-")
        out = Path(tmp) / "work"
    try:
        report = run(out, args.bundle)
        print_report(report)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if (report.missing or report.disagree or report.tracebacks) else 0


if __name__ == "__main__":
    sys.exit(main())
