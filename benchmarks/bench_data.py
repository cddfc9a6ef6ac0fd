"""Data-stage timings on the real data: ingest of cxr-full (6,378 JPEGs) with 1 and 2 decoder processes, and
the DICOM reader on the pydicom-data radiograph (uncompressed vs JPEG 2000).

Run: ``.venv/bin/python benchmarks/bench_data.py [--data ../shared/data/cxr-full]``. Prints images/s and the
2-process speed-up measured in this run; checks the expected counts (554 / 1579 / 4245, 0 rejects).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"COVID19": 554, "NORMAL": 1579, "PNEUMONIA": 4245}


def bench_ingest(data: Path, workers: int, progress: bool) -> float:
    from cxrlab.data.ingest import IngestConfig, ingest

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = ingest(IngestConfig(src=data, out=Path(tmp) / "ingest", workers=workers, progress=progress))
        dt = time.perf_counter() - t0
    ok = res.counts == EXPECTED and res.n_rejected == 0 if data.name == "cxr-full" else res.n_rejected == 0
    print(
        f"ingest {data.name} workers={workers}: {res.n_images} images, {res.n_rejected} rejected, "
        f"{res.n_duplicate} sha256 duplicate groups, {res.n_patients} patients in {dt:.1f} s "
        f"= {res.n_images / dt:.0f} images/s  [{'counts OK' if ok else 'UNEXPECTED COUNTS ' + str(res.counts)}]",
        flush=True,
    )
    return dt


def bench_dicom(repeats: int = 3) -> None:
    from pydicom.data import get_testdata_file

    from cxrlab.data.io import read_xray

    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        path = get_testdata_file(name)
        read_xray(path)  # warm-up (imports, handler discovery)
        t0 = time.perf_counter()
        for _ in range(repeats):
            img = read_xray(path)
        dt = (time.perf_counter() - t0) / repeats
        print(f"read_xray {name} ({img.shape[1]}x{img.shape[0]}): {dt * 1000:.0f} ms/image", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr-full")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    bench_dicom()
    if not args.data.is_dir():
        print(f"skip ingest: {args.data} not found")
        return 0
    one = bench_ingest(args.data, workers=1, progress=not args.no_progress)
    two = bench_ingest(args.data, workers=2, progress=not args.no_progress)
    print(f"ingest speed-up with 2 processes vs 1: {one / two:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
