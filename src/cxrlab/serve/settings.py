"""Settings of the prediction service (``cxrlab serve``).

Apart from ``cxrlab.serve.app`` (which imports torch) so the command line builds its options from them, defaults
and help included, without loading the model stack.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cxrlab.config import StrictModel, field_default
from cxrlab.inference.settings import Backend, PredictSettings

ImageFormat = Literal["PNG", "JPEG", "DICOM", "TIFF", "BMP"]


class ServeSettings(StrictModel):
    """Settings of ``cxrlab serve`` (also accepted by ``create_app``)."""

    host: str = Field("127.0.0.1", description="interface to bind; keep loopback unless behind a proxy with TLS")
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = Field(None, description="require 'Authorization: Bearer TOKEN' on /predict")
    max_upload_mb: float = Field(20.0, gt=0, description="largest accepted upload in MiB (413 above)")
    max_pixels: int = Field(40_000_000, gt=0, description="largest accepted width*height (413 above)")
    formats: tuple[ImageFormat, ...] = Field(("PNG", "JPEG", "DICOM"), description="accepted sniffed formats")
    backend: Backend = Field(
        field_default(PredictSettings, "backend"),
        description="torch, onnx (ONNX Runtime) or onnx-int8 (needs export --int8)",
    )
    device: str = Field(
        field_default(PredictSettings, "device"), description="auto (CUDA when available), cpu, cuda, cuda:N"
    )
    max_batch: int = Field(
        8, ge=1, le=256, description="most queued requests merged into one forward pass (1 = one at a time)"
    )
    decode_workers: int = Field(4, ge=1, le=64, description="concurrent decodes (bounds memory under load)")
    stall_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds a client may stall: an upload with no bytes arriving for this long gets 408, and a new "
        "connection that has not sent its request headers by then is closed",
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
