"""INT8 (``export_int8``, ``cxrlab export RUN --format onnx --int8``): ONNX Runtime static quantization of the
float32 ONNX export (QDQ format, per-channel int8 weights, uint8 activations), calibrated on a few hundred
images of the run's own training split through ``Bundle.preprocess``. Before the file is written the quantised
model is checked against float32 on the run's test split; it is refused (``Int8GateError``, with the figures)
when its macro-F1 drops by more than ``max_f1_drop`` or its top-1 agreement with float32 is below
``min_agreement``. The file (``model.int8.onnx`` beside ``model.onnx``) records the calibration set (split,
dataset version, size) and the check's figures in its metadata (``cxrlab.int8``). It is never made implicitly:
``ensure_int8`` (the ``onnx-int8`` backend of predict/serve) only uses a current one and otherwise says how to
make it, because calibration needs the run's data and the check takes a pass over its test split.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlab.config import field_default
from cxrlab.inference.bundle import Bundle, load_bundle
from cxrlab.inference.export import (
    DEFAULT_OPSET,
    DIGEST_KEY,
    INPUT_NAME,
    META_KEY,
    OUTPUT_NAME,
    ExportError,
    default_path,
    ensure_onnx,
    onnx_is_current,
    onnx_session,
    read_onnx_metadata,
    weights_digest,
)
from cxrlab.inference.infer import read_batches, softmax_rows
from cxrlab.inference.settings import ModelExportSettings

INT8_KEY = "cxrlab.int8"  # ONNX metadata of an INT8 export: calibration set and accuracy check (JSON)
INT8_SUFFIX = ".int8.onnx"
# "a few hundred" training images: enough for min/max ranges, ~1 s of preprocessing
DEFAULT_CALIB_N: int = field_default(ModelExportSettings, "calib_n")
DEFAULT_MAX_F1_DROP: float = field_default(ModelExportSettings, "max_f1_drop")  # 1 point of test macro-F1
DEFAULT_MIN_AGREEMENT: float = field_default(ModelExportSettings, "min_agreement")  # top-1, float32 vs INT8, test


class Int8GateError(ExportError):
    """The quantised model failed the accuracy check against float32; ``report`` holds the figures."""

    def __init__(self, message: str, report: Int8Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Int8Report:
    """What ``export_int8`` measured: the calibration set and the float32-vs-INT8 check on the test split."""

    path: Path | None  # the written file; None when refused
    calibration: dict[str, Any]  # split, dataset_version, n, source, method, seed
    test: dict[str, Any]  # split, dataset_version, n, source
    f1_float32: float
    f1_int8: float
    agreement: float  # fraction of test images with the same top-1 class
    max_abs_prob_diff: float
    max_f1_drop: float
    min_agreement: float
    float_path: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def f1_drop(self) -> float:
        return self.f1_float32 - self.f1_int8

    @property
    def passed(self) -> bool:
        return self.f1_drop <= self.max_f1_drop + 1e-12 and self.agreement >= self.min_agreement - 1e-12

    def summary(self) -> str:
        """One line with every figure of the check."""
        return (
            f"test macro-F1 {self.f1_int8:.4f} INT8 vs {self.f1_float32:.4f} float32 (drop {100 * self.f1_drop:+.2f} "
            f"points, limit {100 * self.max_f1_drop:.2f}); top-1 agreement {100 * self.agreement:.2f}% (limit "
            f">= {100 * self.min_agreement:.2f}%) on {self.test['n']} test images of {self.test['dataset_version']}; "
            f"calibrated on {self.calibration['n']} {self.calibration['split']} images of "
            f"{self.calibration['dataset_version']}"
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        d["float_path"] = str(self.float_path) if self.float_path else None
        d["f1_drop"], d["passed"] = self.f1_drop, self.passed
        return d


def int8_path(bundle: Bundle) -> Path:
    """Where ``export_int8`` writes by default: ``model.int8.onnx`` beside ``model.onnx`` (or ``<ckpt>.int8.onnx``)."""
    f = default_path(bundle, "onnx")
    return f.with_name(f.name[: -len(".onnx")] + INT8_SUFFIX)


def _images(bundle: Bundle, paths: list[str], labels: list[str]) -> tuple[torch.Tensor, list[str], list[str]]:
    """Read and preprocess (``Bundle.preprocess``) ``paths`` with the one read loop; unreadable files are left out."""
    xs, kept, kept_labels = [], [], []
    for batch in read_batches(paths, 64, [], progress=False, prepare=bundle.preprocess):
        xs += batch.inputs
        kept += [paths[i] for i in batch.indices]
        kept_labels += [labels[i] for i in batch.indices]
    if not xs:
        raise ExportError(f"none of the {len(paths)} images could be read (first: {paths[0] if paths else '-'})")
    return torch.stack(xs), kept, kept_labels


def _split_items(bundle: Bundle, split: str, data: str | Path | None):  # -> cxrlab.data.items.Items
    """The images of ``split`` of the run's own split (or of ``data``), as ``cxrlab evaluate`` resolves them."""
    from cxrlab.data.items import resolve_items
    from cxrlab.errors import EvalError

    try:
        return resolve_items(
            bundle.path,
            split,
            Path(data) if data is not None else None,
            list(bundle.meta.class_names),
            bundle.meta.config or {},
        )
    except EvalError as e:
        raise ExportError(f"INT8 export needs the run's {split} images: {e}") from None


def _logits(session, x: torch.Tensor | np.ndarray, batch_size: int = 32) -> np.ndarray:
    xn = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: xn[i : i + batch_size]})[0] for i in range(0, len(xn), batch_size)]
    return np.concatenate(out)


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """Macro-F1 over the classes present in ``y_true``, exactly as ``cxrlab evaluate`` computes it."""
    from cxrlab.analysis.metrics import confusion_matrix, metrics_from_confusion

    cm = confusion_matrix(y_true, y_pred, k)
    return float(metrics_from_confusion(cm, cm.sum(axis=1) > 0)["f1_macro"])


def float_nodes(path: str | Path) -> list[str]:
    """The nodes INT8 export keeps in float32: the stem convolution (the first Conv, which reads the image) and the
    classifier (the last Gemm/MatMul, which writes the logits). The first and last layers are the most sensitive to
    8-bit rounding and hold ~3% of the FLOPs. Measured on a `configs/cpu.yaml` model trained on cxr-tiny (test
    macro-F1 0.973): quantising every layer dropped test macro-F1 by 2.0 points (98.0% top-1 agreement, refused
    by the accuracy check); keeping these two in float32 dropped it by 0.7 points (99.3% agreement)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + heads[-1:]


def quantize_int8(float_path: str | Path, out: str | Path, calib: np.ndarray, *, batch_size: int = 16) -> Path:
    """ONNX Runtime static quantization of ``float_path`` into ``out``: QDQ, per-channel int8 weights, uint8
    activations with min/max ranges from ``calib`` (a preprocessed N x C x H x W float32 batch); the stem and the
    classifier stay float32 (:func:`float_nodes`).

    uint8 activations with int8 weights (U8S8) and no range reduction is ORT's advice for x86 CPUs with VNNI (this
    machine; int8 activations ran ~3x slower here); on a pre-VNNI x86 CPU U8S8 can saturate, which the accuracy
    check of ``export_int8`` would catch when run on that machine.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(calib):
                return None
            batch = np.ascontiguousarray(calib[self.i : self.i + batch_size], dtype=np.float32)
            self.i += batch_size
            return {INPUT_NAME: batch}

        def rewind(self) -> None:
            self.i = 0

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="cxrlab-int8-") as work:
        pre = Path(work) / "pre.onnx"
        # shape inference + ORT's graph clean-ups before quantization (ORT's recommended first step)
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            nodes_to_exclude=float_nodes(pre),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # the calibration model reduces every tensor to its min/max per batch, so memory does not grow with the
            # activations (ORT 1.32's CalibMaxIntermediateOutputs would drop batches instead of merging them)
            calibrate_method=CalibrationMethod.MinMax,
        )
    return out


def export_int8(
    bundle: Bundle | str | Path,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    calib_n: int = DEFAULT_CALIB_N,
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    seed: int = 0,
    opset: int = DEFAULT_OPSET,
) -> Int8Report:
    """Quantise ``bundle``'s network to INT8 and write it only if it keeps float32's accuracy (module doc).

    Calibration: ``calib_n`` images drawn (``seed``) from the run's training split (``data``: another split
    directory / manifest / class folders instead, for a bare bundle), through ``Bundle.preprocess``. Check: the
    run's (or ``data``'s) test split through the float32 ONNX export and the INT8 model. Raises
    ``Int8GateError`` (no file written) when test macro-F1 drops by more than ``max_f1_drop`` or top-1
    agreement is below ``min_agreement``. ``out`` defaults to ``int8_path(bundle)``.
    """
    import time

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device="cpu")
    if calib_n < 1:
        raise ExportError(f"calib_n must be >= 1, got {calib_n}")
    target = Path(out) if out is not None else int8_path(b)
    if target.is_dir() or (out is not None and str(out).endswith(os.sep)):
        target = target / Path(int8_path(b)).name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise ExportError(f"cannot write the INT8 export into {target.parent} (read-only); pass --out FILE_OR_DIR")
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    float_path = ensure_onnx(b)
    seconds["float_export"] = time.perf_counter() - t

    t = time.perf_counter()
    train = _split_items(b, "train", data)
    if (
        data is None
        and b.meta.dataset_version not in ("", "unknown")
        and train.dataset_version != b.meta.dataset_version
    ):
        # a re-made split may put the run's test images into "train": calibrating on them would leak
        raise ExportError(
            f"the run was trained on dataset version {b.meta.dataset_version} but its split {train.source} is now "
            f"{train.dataset_version}; pass --data SPLIT_DIR to calibrate and check on another split explicitly"
        )
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(train.paths))[:calib_n].tolist())
    calib_x, calib_paths, _ = _images(b, [train.paths[i] for i in pick], [train.labels[i] for i in pick])
    calibration = {
        "split": "train",
        "dataset_version": train.dataset_version,
        "n": len(calib_paths),
        "of": len(train.paths),
        "source": train.source,
        "seed": seed,
        "method": "MinMax",
        "format": "QDQ, per-channel int8 weights, uint8 activations; stem conv and classifier in float32",
    }
    seconds["calibration_images"] = time.perf_counter() - t

    test = _split_items(b, "test", data)
    t = time.perf_counter()
    test_x, test_paths, test_labels = _images(b, test.paths, test.labels)
    seconds["test_images"] = time.perf_counter() - t

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        t = time.perf_counter()
        quantize_int8(float_path, tmp, calib_x.numpy())
        seconds["quantize"] = time.perf_counter() - t
        del calib_x

        t = time.perf_counter()
        ref = _logits(onnx_session(float_path), test_x)
        got = _logits(onnx_session(tmp), test_x)
        seconds["check"] = time.perf_counter() - t
        cidx = {c: i for i, c in enumerate(b.meta.class_names)}
        y = np.array([cidx[c] for c in test_labels])
        k = b.meta.num_classes
        p_ref, p_got = softmax_rows(ref), softmax_rows(got)
        report = Int8Report(
            path=None,
            calibration=calibration,
            test={
                "split": "test",
                "dataset_version": test.dataset_version,
                "n": len(test_paths),
                "source": test.source,
            },
            f1_float32=_macro_f1(y, ref.argmax(1), k),
            f1_int8=_macro_f1(y, got.argmax(1), k),
            agreement=float(np.mean(ref.argmax(1) == got.argmax(1))),
            max_abs_prob_diff=float(np.max(np.abs(p_ref - p_got))),
            max_f1_drop=max_f1_drop,
            min_agreement=min_agreement,
            float_path=float_path,
            seconds=seconds,
        )
        if not report.passed:
            raise Int8GateError(
                f"INT8 export refused: {report.summary()}; the float32 export stays usable (--backend onnx)", report
            )

        import onnx

        m = onnx.load(str(tmp))
        del m.metadata_props[:]
        record = {k2: v for k2, v in report.to_json().items() if k2 not in ("path", "float_path", "seconds")}
        for key, value in (
            (META_KEY, json.dumps(b.meta.to_json())),
            (DIGEST_KEY, weights_digest(b)),
            (INT8_KEY, json.dumps(record)),
        ):
            prop = m.metadata_props.add()
            prop.key, prop.value = key, value
        m.producer_name = "cxrlab"
        onnx.save(m, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    report.path = target
    return report


def read_int8_record(path: str | Path) -> dict[str, Any]:
    """The calibration set and accuracy check an INT8 export recorded (``{}`` for a float32 file)."""
    raw = read_onnx_metadata(path).get(INT8_KEY)
    return json.loads(raw) if raw else {}


def ensure_int8(bundle: Bundle) -> Path:
    """The bundle's current INT8 export (``int8_path``): made from exactly these weights and checked.

    Never made here (module doc): a missing or stale one raises ``ExportError`` saying how to make it.
    """
    path = int8_path(bundle)
    if onnx_is_current(path, bundle) and read_int8_record(path):
        return path
    why = "is stale (made from other weights)" if path.is_file() else "does not exist"
    raise ExportError(
        f"the INT8 export {path} {why}: run `cxrlab export {bundle.path} --format onnx --int8` first (it calibrates "
        "on the run's training split and checks test accuracy against float32)"
    )
