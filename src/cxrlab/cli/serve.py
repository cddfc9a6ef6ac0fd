"""CLI commands for using a trained model: ``cxrlab predict``, ``cxrlab export``, ``cxrlab serve``.

Every output carries ``cxrlab.RESEARCH_NOTICE``: the table's caption, a top-level ``notice`` field in JSON, and
a ``notice`` column on every CSV row (a comment line would break plain CSV readers; a column keeps the file
parseable by ``csv``/pandas/spreadsheets and the notice travels with any row copied out of it).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import get_args

import typer
from rich.console import Console
from rich.table import Table

import cxrlab
from cxrlab.cli.options import from_field
from cxrlab.inference.settings import Exporter, ModelExportSettings, PredictSettings
from cxrlab.serve.settings import ServeSettings

console = Console()
err_console = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class BackendName(StrEnum):
    torch = "torch"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"


class ExportFormatName(StrEnum):
    onnx = "onnx"
    torchscript = "torchscript"


def register(app: typer.Typer) -> None:
    """Add ``predict``, ``export`` and ``serve`` to the root app (idempotent: main() may run more than once)."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("predict", predict_cmd), ("export", export_cmd), ("serve", serve_cmd)):
        if name not in have:
            app.command(name)(fn)


# -------------------------------------------------------------------------------------------------- predict


OOD_COLUMNS = ("ood", "ood_score", "ood_reasons")


def format_csv(preds, classes: list[str]) -> str:
    """CSV text: path, label, prob_<class>..., error, cam_path, source, ood, ood_score, ood_reasons, notice (the
    notice on every row; the ood columns are empty for a bundle without shift statistics)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["path", "label", *[f"prob_{c}" for c in classes], "error", "cam_path", "source", *OOD_COLUMNS, "notice"]
    w.writerow(head)
    for p in preds:
        probs = [f"{p.probabilities[c]:.6f}" if p.ok else "" for c in classes]
        ood = ["" if p.ood is None else str(p.ood).lower(), "" if p.ood_score is None else f"{p.ood_score:.3f}"]
        row = [p.path, p.label or "", *probs, p.error or "", p.cam_path or "", p.source or ""]
        w.writerow([*row, *ood, "; ".join(p.ood_reasons), cxrlab.RESEARCH_NOTICE])
    return buf.getvalue()


def format_json(preds, model_info: dict, ignored: list[tuple[str, str]] | None = None, shift=None) -> str:  # noqa: ANN001
    """JSON text: {notice, model, summary, predictions: [...], ignored: [{path, reason}], label_shift} (``ignored``:
    files in the input folders that are not image inputs, with the reason; ``label_shift``: the check over all
    predictions, cxrlab.analysis.shift.LabelShift, null for a bundle without shift statistics)."""
    ignored = ignored or []
    doc = {
        "notice": cxrlab.RESEARCH_NOTICE,
        "model": model_info,
        "summary": {"images": len(preds), "errors": sum(not p.ok for p in preds)},
        "predictions": [p.to_dict() for p in preds],
        "ignored": [{"path": p, "reason": why} for p, why in ignored],
        "label_shift": shift.to_json() if shift is not None else None,
    }
    return json.dumps(doc, indent=2)


def _common_root(preds) -> Path | None:
    import os

    try:
        root = Path(os.path.commonpath([str(Path(p.path).resolve().parent) for p in preds]))
    except ValueError:
        return None
    return root if len(preds) > 1 and str(root) != root.anchor else None


def format_table(preds, classes: list[str]) -> Table:
    """A rich table (file names relative to the inputs' common folder) with the notice as its caption."""
    root = _common_root(preds)
    title = f"files under {root}" if root is not None else None
    t = Table(title=title, title_justify="left", caption=f"[bold yellow]{cxrlab.RESEARCH_NOTICE}[/]")
    t.caption_justify = "left"
    t.add_column("file", overflow="fold", min_width=20)
    t.add_column("label", style="bold")
    for c in classes:
        t.add_column(c, justify="right")
    t.add_column("error / cam / out of distribution", overflow="fold")
    for p in preds:
        name = str(Path(p.path).resolve().relative_to(root)) if root is not None else p.path
        if p.ok:
            probs = [f"{p.probabilities[c]:.3f}" for c in classes]
            note = "; ".join(x for x in [p.cam_path or "", *(f"[red]OOD: {r}[/]" for r in p.ood_reasons)] if x)
            t.add_row(name, p.label, *probs, note)
        else:
            t.add_row(name, "[red]-[/]", *["" for _ in classes], f"[red]{p.error}[/]")
    return t


def predict_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory, run directory (uses its bundle/) or bundle.json."),
    paths: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/TIFF/DICOM ...) and folders (recursive)."),
    cam: Path | None = typer.Option(None, "--cam", help="Write a Grad-CAM overlay PNG per image into this folder."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
    backend: BackendName = from_field(PredictSettings, "backend", "--backend"),
    batch_size: int = from_field(PredictSettings, "batch_size", "--batch-size"),
    device: str = from_field(PredictSettings, "device", "--device"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the output here instead of stdout."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 1 when any input could not be read (default: only when none could)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (on a terminal)."),
) -> None:
    """Classify X-ray images with a trained bundle, using the bundle's own preprocessing.

    Unreadable files are reported with their reason (error column) and the rest go on.
    """
    from cxrlab.inference.predict import Predictor

    predictor = Predictor(
        bundle, backend=backend.value, device=device, batch_size=batch_size, progress=None if progress else False
    )
    preds = predictor.predict(paths, cam_dir=cam)
    from cxrlab.data.sources import input_sources

    for p, src in zip(preds, input_sources(paths, [p.path for p in preds]), strict=True):
        p.source = src
    n_err = sum(not p.ok for p in preds)
    shift = predictor.label_shift(preds)
    if fmt is OutputFormat.table:
        table = format_table(preds, predictor.classes)
        if out is not None:
            buf = io.StringIO()
            Console(file=buf, width=200).print(table)
            text = buf.getvalue()
        else:
            console.print(table)
    else:
        text = (
            format_csv(preds, predictor.classes)
            if fmt is OutputFormat.csv
            else format_json(preds, predictor.model_info, predictor.ignored, shift)
        )
        if out is None:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if out is not None:  # atomic: an error while writing leaves no 0-byte or partial file
        from cxrlab.atomic import write_text_atomic

        write_text_atomic(out, text)
    if predictor.ignored:
        shown = "; ".join(f"{p} ({why})" for p, why in predictor.ignored[:5])
        more = f" and {len(predictor.ignored) - 5} more" if len(predictor.ignored) > 5 else ""
        err_console.print(
            f"{len(predictor.ignored)} file(s) not classified (not image inputs): {shown}{more}",
            markup=False,
            highlight=False,
        )
    summary = f"{len(preds) - n_err} of {len(preds)} images classified with {predictor.meta.model_name}"
    if n_err:
        summary += f"; [red]{n_err} could not be read or classified[/] (see the error column)"
    if out is not None:
        summary += f"; written to {out}"
    err_console.print(summary)
    n_ood, n_ok = sum(bool(p.ood) for p in preds), len(preds) - n_err
    if n_ood:
        from cxrlab.analysis.shift import ood_excess

        # a few flags are what the threshold lets through; clearly more mean foreign data (binomial test)
        many = ood_excess(n_ood, n_ok, predictor.ood.expected_flag_rate)[0] or n_ok == 1
        level = "[bold red]warning:[/]" if many else "[yellow]note:[/]"
        err_console.print(
            f"{level} {n_ood} of {n_ok} images are unlike the training images (out of distribution); do not trust "
            "their predictions (see the ood columns)"
        )
    if shift is not None and shift.shifted:
        err_console.print(f"[bold red]warning:[/] {shift.message}")
    if fmt is not OutputFormat.table or out is not None:
        err_console.print(f"[yellow]{cxrlab.RESEARCH_NOTICE}[/]")
    if n_err and (strict or n_err == len(preds)):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------- export


def export_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory, run directory (uses its bundle/) or bundle.json."),
    fmt: ExportFormatName = typer.Option(..., "--format", "-f", help="onnx or torchscript."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output file or folder (default: model.onnx / model.torchscript.pt in the bundle)."
    ),
    opset: int = from_field(ModelExportSettings, "opset", "--opset"),
    exporter: str = from_field(ModelExportSettings, "exporter", "--exporter"),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="ONNX only: INT8 static quantization calibrated on the run's training split; refused when test "
        "accuracy drops (see --max-f1-drop, --min-agreement). Writes model.int8.onnx beside model.onnx.",
    ),
    calib_n: int = from_field(ModelExportSettings, "calib_n", "--calib-n"),
    data: Path | None = typer.Option(
        None, "--data", help="--int8: split directory to take train/test images from (default: the run's own)."
    ),
    max_f1_drop: float = from_field(ModelExportSettings, "max_f1_drop", "--max-f1-drop"),
    min_agreement: float = from_field(ModelExportSettings, "min_agreement", "--min-agreement"),
) -> None:
    """Export the bundle's network (input: the preprocessed batch, dynamic batch axis; output: logits).

    The export is checked against PyTorch (max |difference| <= 1e-4) before it is written; an --int8 export is
    checked against float32 on the run's test split (macro-F1 drop, top-1 agreement) and refused if it fails.
    """
    from cxrlab.inference.bundle import load_bundle
    from cxrlab.inference.export import ExportError, export, max_abs_diff, probe_batch

    if exporter not in get_args(Exporter):
        raise ExportError(f"unknown --exporter {exporter!r}; choose {' or '.join(get_args(Exporter))}")
    if int8 and fmt is not ExportFormatName.onnx:
        raise ExportError("--int8 needs --format onnx")
    b = load_bundle(bundle, device="cpu")
    if int8:
        _export_int8(b, out, data, calib_n, max_f1_drop, min_agreement)
        return
    path = export(b, fmt.value, out, opset=opset, exporter=exporter)  # type: ignore[arg-type]
    diff = max_abs_diff(path, fmt.value, b.model, probe_batch(b, n=4, seed=1))  # type: ignore[arg-type]
    console.print(f"[bold]export[/]: {b.meta.model_name} -> {path} ({path.stat().st_size / 1e6:.1f} MB)")
    console.print(
        f"input 'input' N x {b.meta.in_chans} x {b.meta.img_size[0]} x {b.meta.img_size[1]} (preprocessed, "
        f"dynamic N) -> output 'logits' N x {b.meta.num_classes} ({', '.join(b.meta.class_names)}); "
        f"max |diff| vs PyTorch {diff:.1e}"
    )
    console.print(f"[yellow]{cxrlab.RESEARCH_NOTICE}[/]")


def _export_int8(b, out: Path | None, data: Path | None, calib_n: int, max_f1_drop: float, min_agreement: float):
    from cxrlab.inference.quantize import export_int8

    with console.status("INT8: float32 export, calibration on the training split, check on the test split"):
        rep = export_int8(b, out, data=data, calib_n=calib_n, max_f1_drop=max_f1_drop, min_agreement=min_agreement)
    size = rep.path.stat().st_size / 1e6
    float_size = rep.float_path.stat().st_size / 1e6 if rep.float_path else float("nan")
    console.print(
        f"[bold]export[/]: {b.meta.model_name} INT8 -> {rep.path} ({size:.1f} MB; float32 {float_size:.1f} MB)"
    )
    console.print(f"accuracy check passed: {rep.summary()}; max |probability diff| {rep.max_abs_prob_diff:.3f}")
    console.print(f"use it with: cxrlab predict {b.path} IMAGES --backend onnx-int8 (or serve --backend onnx-int8)")
    console.print(f"[yellow]{cxrlab.RESEARCH_NOTICE}[/]")


# ---------------------------------------------------------------------------------------------------- serve


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


TOKEN_ENV = "CXRLAB_TOKEN"


def read_token_file(path: Path) -> str:
    """The bearer token: the first line of ``path``, stripped; an empty or unreadable file is a ``ConfigError``."""
    from cxrlab.config import ConfigError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --token-file {path}: {getattr(e, 'strerror', None) or e}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"--token-file {path} is empty: put the token on its first line")
    return token


def serve_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory, run directory (uses its bundle/) or bundle.json."),
    host: str = from_field(ServeSettings, "host", "--host"),
    port: int = from_field(ServeSettings, "port", "--port"),
    token: str | None = from_field(
        ServeSettings,
        "token",
        "--token",
        envvar=TOKEN_ENV,
        note=f"A token on the command line is visible to every user in `ps`: prefer the {TOKEN_ENV} environment "
        "variable or --token-file.",
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="Read the bearer token from this file (its first line; keep the file readable only by you).",
        show_default=False,
    ),
    max_upload_mb: float = from_field(ServeSettings, "max_upload_mb", "--max-upload-mb"),
    max_pixels: int = from_field(ServeSettings, "max_pixels", "--max-pixels"),
    backend: BackendName = from_field(ServeSettings, "backend", "--backend"),
    device: str = from_field(ServeSettings, "device", "--device"),
    max_batch: int = from_field(ServeSettings, "max_batch", "--max-batch"),
    stall_timeout_s: float = from_field(ServeSettings, "stall_timeout_s", "--stall-timeout"),
) -> None:
    """Serve the model over HTTP: web page at /, POST /predict, GET /health, OpenAPI docs at /docs."""
    import os

    import uvicorn

    from cxrlab.config import ConfigError, build_config
    from cxrlab.serve.app import create_app
    from cxrlab.serve.http import http_protocol

    if token_file is not None:
        if token is not None:
            raise ConfigError(f"give the token once: --token-file or --token/{TOKEN_ENV}, not both")
        token = read_token_file(token_file)
    elif token is not None and os.environ.get(TOKEN_ENV) != token:
        err_console.print(
            f"[yellow]warning:[/] --token on the command line is visible to other users (ps, shell history); "
            f"use {TOKEN_ENV}=... or --token-file instead"
        )

    settings = build_config(
        ServeSettings,
        {
            "host": host,
            "port": port,
            "token": token,
            "max_upload_mb": max_upload_mb,
            "max_pixels": max_pixels,
            "backend": backend.value,
            "device": device,
            "max_batch": max_batch,
            "stall_timeout_s": stall_timeout_s,
        },
        source="cxrlab serve options",
    )
    if not is_loopback(host) and token is None:
        err_console.print(
            f"[yellow]warning:[/] serving on {host} without --token: anyone who can reach this port can use the model"
        )
    app = create_app(bundle, settings)
    info = app.state.predictor.model_info
    console.print(f"[bold]serve[/]: {info['name']} ({', '.join(info['classes'])}) on http://{host}:{port}/")
    console.print(f"[yellow]{cxrlab.RESEARCH_NOTICE}[/]")
    uvicorn.run(app, host=host, port=port, log_level="info", http=http_protocol(settings.stall_timeout_s))
