"""Luck is not a result: rerun every test that trains a model on data drawn with ``CXRLAB_TEST_SEED`` (pytest marker
``trains``) once per data seed, and print one pass table (test x seed).

    python benchmarks/seed_robustness.py                 # seeds 1-5, the `trains` tests
    python benchmarks/seed_robustness.py --seeds 1 2 3 4 5 6 7 --all   # every test of the suite, 7 seeds
    python benchmarks/seed_robustness.py --seeds 2 3 -- tests/test_int8.py   # some files ("--" ends the seeds)

Each seed runs in a fresh pytest process (so nothing trained for one seed is reused by the next). Exit status 0
only when every selected test passed (or skipped) on every seed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, select: list[str], extra: list[str]) -> tuple[dict[str, str], float]:
    """Outcome per test id ("pass" / "FAIL" / "skip") of one pytest run with ``CXRLAB_TEST_SEED=seed``."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {**os.environ, "CXRLAB_TEST_SEED": str(seed), "NO_ALBUMENTATIONS_UPDATE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *select, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if not xml.is_file():
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"seed {seed}: pytest wrote no report (exit {proc.returncode})")
        out: dict[str, str] = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out[name] = "FAIL"
            elif case.find("skipped") is not None:
                out[name] = "skip"
            else:
                out[name] = "pass"
        if proc.returncode not in (0, 5) and "FAIL" not in out.values():
            sys.stderr.write(proc.stdout[-3000:])
        return out, secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="data seeds (default 1-5)")
    ap.add_argument("--all", action="store_true", help="run the whole suite per seed, not only the `trains` tests")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. a test file or -k EXPR)")
    args = ap.parse_args(argv)
    select = [] if args.all else ["-m", "trains"]
    results: dict[int, dict[str, str]] = {}
    for seed in args.seeds:
        res, secs = run_seed(seed, select, args.pytest_args)
        results[seed] = res
        counts = {k: sum(v == k for v in res.values()) for k in ("pass", "FAIL", "skip")}
        print(f"seed {seed}: {counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped ({secs:.0f} s)")
        sys.stdout.flush()
    tests = sorted({t for r in results.values() for t in r})
    width = max((len(t) for t in tests), default=4)
    print()
    print(f"| {'test'.ljust(width)} | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 8 for _ in args.seeds) + "|")
    for t in tests:
        print(f"| {t.ljust(width)} | " + " | ".join(results[s].get(t, "-").ljust(6) for s in args.seeds) + " |")
    failed = [(t, s) for s in args.seeds for t, v in results[s].items() if v == "FAIL"]
    n_pass = sum(v == "pass" for r in results.values() for v in r.values())
    print()
    print(f"{len(tests)} tests x {len(args.seeds)} seeds: {n_pass} passed, {len(failed)} failed")
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
