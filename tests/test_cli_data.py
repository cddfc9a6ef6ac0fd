"""CLI contracts of `cxrlab data ingest` and `cxrlab data synth` (exit codes, files written, summaries)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import cxrlab.cli
import cxrlab.cli.data
from cxrlab.cli import main
from cxrlab.data.manifest import read_manifest


@pytest.fixture(autouse=True)
def _wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at 80 columns when captured; widen so paths and messages stay on one line."""
    monkeypatch.setattr(cxrlab.cli.data, "console", Console(width=400))
    monkeypatch.setattr(cxrlab.cli.data, "err_console", Console(stderr=True, width=400))
    monkeypatch.setattr(cxrlab.cli, "err_console", Console(stderr=True, width=400))


def _folder(root: Path, bad: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(root / label / f"{label}_{i}.png")
    if bad:
        (root / "NORMAL" / "broken.png").write_text("definitely not a PNG")
    return root


@pytest.mark.parametrize(
    "args", [["--help"], ["data", "--help"], ["data", "ingest", "--help"], ["data", "synth", "--help"]]
)
def test_help_everywhere(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Usage" in out
    if args[-2:] == ["ingest", "--help"]:
        assert "--patient-regex" in out and "--strict" in out and "--csv" in out


def test_ingest_ok_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["data", "ingest", str(src), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "NORMAL" in text and "PNEUMONIA" in text and "rejected" in text and "manifest.csv" in text
    assert len(read_manifest(out)) == 6


def test_ingest_rejects_warn_then_strict_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(tmp_path / "src", bad=True)
    assert main(["data", "ingest", str(src), "--out", str(tmp_path / "o1"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "warning" in cap.err and "1 file(s) rejected" in cap.err
    assert "broken.png" in cap.out  # the rejects table names the file and its reason

    out2 = tmp_path / "o2"
    assert main(["data", "ingest", str(src), "--out", str(out2), "--strict", "--no-progress"]) == 2
    cap = capsys.readouterr()
    assert "--strict" in cap.err and "rejects.csv" in cap.err
    assert len(read_manifest(out2)) == 6  # still written
    assert json.loads((out2 / "ingest.json").read_text())["n_rejected"] == 1


def test_ingest_csv_flag_and_regex(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    listing = tmp_path / "listing.txt"
    listing.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted(src.rglob("*.png"))))
    out = tmp_path / "out"
    rc = main(
        ["data", "ingest", str(listing), "--csv", "--out", str(out), "--patient-regex", r"_(\d)\.", "--no-progress"]
    )
    assert rc == 0
    m = read_manifest(out)
    assert len(m) == 6 and sorted(set(m["patient_id"])) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--patient-regex", "(bad"], "regular expression"),
        ([], "not found"),
    ],
)
def test_ingest_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    src = tmp_path / "missing" if not extra else _folder(tmp_path / "src")
    assert main(["data", "ingest", str(src), "--out", str(tmp_path / "o"), *extra]) == 2
    assert fragment in capsys.readouterr().err


def test_synth_writes_class_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ph"
    rc = main(["data", "synth", "--out", str(out), "--n-per-class", "2", "--size", "64", "--shortcut-class", "COVID19"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert all(len(list((out / c).glob("*.png"))) == 2 for c in ("COVID19", "NORMAL", "PNEUMONIA"))
    assert "COVID19" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(out), "--shortcut-class", "FLU"]) == 2
    assert "FLU" in capsys.readouterr().err
