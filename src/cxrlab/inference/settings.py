"""Settings of the inference commands: ``cxrlab predict``, ``cxrlab export`` (float32 and ``--int8``) and
``cxrlab fit-shift``.

Light (pydantic only, no torch), so the command line builds its options from these fields, defaults and help
included, and the inference code (``Predictor``, ``export``, ``export_int8``) takes its keyword defaults from the
same fields: each default is written once, here.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from cxrlab.config import StrictModel

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = get_args(Backend)
Exporter = Literal["torchscript", "dynamo"]


class PredictSettings(StrictModel):
    """How ``cxrlab predict`` (``Predictor``) and ``cxrlab fit-shift`` run the network."""

    backend: Backend = Field(
        "torch",
        description="torch, onnx (ONNX Runtime; exports to <bundle>/model.onnx once) or onnx-int8 (the checked "
        "INT8 export from `cxrlab export RUN --format onnx --int8`)",
    )
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    batch_size: int = Field(32, ge=1, description="images per forward pass")


class ModelExportSettings(StrictModel):
    """How ``cxrlab export`` writes the network: ONNX opset and exporter; for INT8, the calibration set's size and
    the accuracy limits past which the export is refused."""

    opset: int = Field(17, ge=11, description="ONNX opset")
    exporter: Exporter = Field("torchscript", description="ONNX exporter: torchscript (fast) or dynamo")
    calib_n: int = Field(300, ge=1, description="training images to calibrate INT8 on")
    max_f1_drop: float = Field(
        0.01, ge=0, le=1, description="refuse INT8 when test macro-F1 drops by more than this (0.01 = 1 point)"
    )
    min_agreement: float = Field(
        0.98, ge=0, le=1, description="refuse INT8 when top-1 agreement with float32 on test is below this"
    )
