"""Read any chest X-ray file into one 2-D grayscale array.

Formats: PNG, JPEG, BMP, TIFF, GIF, WebP, JPEG 2000 (8- and 16-bit; gray, RGB, RGBA, palette) through Pillow,
and DICOM through pydicom (uncompressed and the compressed transfer syntaxes pydicom's installed handlers
decode; JPEG 2000 goes through Pillow's openjpeg). The format is sniffed from the content (magic bytes), never
trusted from the file extension. Files and in-memory bytes share one decode path (:func:`decode_xray`).

Conversion rules (the output is ``uint8`` 0..255 or ``float32`` 0..1):

- 8-bit gray: unchanged. RGB / palette / CMYK: ITU-R 601-2 luma (Pillow's ``convert("L")``).
- With alpha (RGBA, LA, palette with transparency): composited on **black** (gray * alpha / 255), so a
  transparent area reads as air (black), never as bone (white).
- More than 8 bits without display information (16-bit PNG/TIFF, 32-bit int/float): **min-max** stretched to
  the full output range (the darkest pixel -> 0, the brightest -> 255); a constant image gives all zeros.
- DICOM: modality rescale (slope/intercept or Modality LUT), then the first VOI transform in the header
  (VOI LUT sequence, else Window Center/Width with its VOI LUT Function) mapped to the full output range, else
  min-max as above; MONOCHROME1 is inverted afterwards so that high attenuation (bone) is always bright.
  Multi-frame DICOM is rejected as unsupported (a radiograph is one frame). For multi-page TIFF/GIF the first
  page is read.

Every failure raises a subclass of :class:`ImageReadError` with ``.path`` and ``.reason``: zero-byte,
truncated, corrupt, not an image, too many pixels (Pillow's ``Image.MAX_IMAGE_PIXELS`` decompression-bomb limit,
also applied to DICOM), unsupported, not found.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrlab.errors import CxrlabError

DType = Literal["uint8", "float32"]

# File extensions that ingest treats as image candidates (lower case). Files without an extension are
# candidates only when their content sniffs as an image (DICOM files often have no extension).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jp2", ".j2k"}
    | {".dcm", ".dicom", ".dic"}
)
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})
SUPPORTED_FORMATS = "PNG, JPEG, BMP, TIFF, GIF, WebP, JPEG 2000, DICOM"

# Pillow format id per sniffed format; opening is restricted to it so a mislabelled file is not re-guessed.
_PIL_FORMATS = {
    "PNG": "PNG",
    "JPEG": "JPEG",
    "BMP": "BMP",
    "TIFF": "TIFF",
    "GIF": "GIF",
    "WEBP": "WEBP",
    "JPEG2000": "JPEG2000",
}
_MODE_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "RGBX": 8, "CMYK": 8, "YCbCr": 8}
_MODE_BITS.update({"LAB": 8, "HSV": 8, "I": 32, "F": 32, "La": 8, "RGBa": 8})


@dataclass(frozen=True)
class XrayInfo:
    """What the file holds before conversion: size, original mode and bits per sample."""

    width: int
    height: int
    mode: str  # Pillow mode (L, I;16, RGB, RGBA, P ...) or the DICOM photometric interpretation
    bit_depth: int  # bits per sample of the original (8, 16, 12 for DICOM BitsStored ...)
    format: str = ""  # sniffed container: PNG, JPEG, BMP, TIFF, GIF, WEBP, JPEG2000, DICOM


# ------------------------------------------------------------------------------------------------- errors


class ImageReadError(CxrlabError):
    """A file could not be read as an X-ray; ``.path`` names it and ``.reason`` says why."""

    kind = "unreadable"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # picklable across the ingest process pool
        return (self.__class__, (self.path, self.reason))


class ImageNotFoundError(ImageReadError):
    kind = "not_found"


class EmptyImageError(ImageReadError):
    kind = "empty"


class TruncatedImageError(ImageReadError):
    kind = "truncated"


class CorruptImageError(ImageReadError):
    kind = "corrupt"


class NotAnImageError(ImageReadError):
    kind = "not_image"


class ImageTooLargeError(ImageReadError):
    kind = "too_large"


class UnsupportedImageError(ImageReadError):
    kind = "unsupported"


# ------------------------------------------------------------------------------------------------ sniffing


def sniff_format(head: bytes, name: str = "") -> str | None:
    """The image container in ``head`` (the first >= 132 bytes) or None. ``name`` only decides whether a
    DICOM without the 128-byte preamble is plausible (extension .dcm/.dicom/.dic or none)."""
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself hold a TIFF header (dual-personality files)
        return "DICOM"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 26:
        return "BMP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    suffix = Path(name).suffix.lower()
    # DICOM without preamble: starts with a group 0x0002 / 0x0008 tag (little endian)
    if (suffix in DICOM_EXTENSIONS or suffix == "") and head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) >= 8:
        return "DICOM"
    return None


def _describe_non_image(head: bytes) -> str:
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if head.lstrip().startswith((b"<!DOCTYPE", b"<html", b"<HTML", b"<?xml", b"<svg")):
        return "an HTML/XML/SVG text file"
    sample = head[:512]
    try:
        sample.decode("utf-8")
        is_text = all(b >= 32 or b in (9, 10, 13) for b in sample)
    except UnicodeDecodeError:
        is_text = False
    if is_text:
        return f"a text file (starts with {sample[:24]!r})"
    return f"unknown content (starts with {sample[:12].hex(' ')})"


# ------------------------------------------------------------------------------------------------- scaling


def _minmax(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float64, copy=False)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(a.shape, np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _to_dtype(img: np.ndarray, dtype: DType) -> np.ndarray:
    """``img`` is uint8 0..255 or float 0..1; return it as ``dtype``."""
    if dtype == "uint8":
        if img.dtype == np.uint8:
            return np.ascontiguousarray(img)
        return np.ascontiguousarray(np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8))
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(np.clip(img, 0.0, 1.0).astype(np.float32))


def _check_dtype(dtype: str) -> DType:
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"dtype must be 'uint8' or 'float32', got {dtype!r}")
    return dtype  # type: ignore[return-value]


def _check_pixels(path: str, width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageTooLargeError(
            path,
            f"{width}x{height} = {width * height:,} pixels exceeds the decompression-bomb limit "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,} (raise it only for files you trust)",
        )


# --------------------------------------------------------------------------------------------------- Pillow


def _png_bit_depth(data: bytes) -> int | None:
    # IHDR is always the first chunk: 8 signature + 4 length + 4 type + 4 w + 4 h + 1 bit depth
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else None


def _pil_bit_depth(im: Image.Image, head: bytes) -> int:
    if im.format == "PNG":
        bits = _png_bit_depth(head)
        if bits:
            return int(bits)
    if im.format == "TIFF":
        bps = getattr(im, "tag_v2", {}).get(258)
        if bps:
            return int(max(bps) if isinstance(bps, tuple | list) else bps)
    if im.mode.startswith("I;16"):
        return 16
    return _MODE_BITS.get(im.mode, 8)


def _open_pil(fileobj: io.BytesIO | io.BufferedReader, path: str, fmt: str) -> Image.Image:
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both are errors here. catch_warnings is
    # process-global (not thread-safe); callers also run _check_pixels, which enforces the limit regardless.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(fileobj, formats=[_PIL_FORMATS[fmt]])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(path, f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise CorruptImageError(
                path, f"corrupt {fmt}: has a {fmt} signature but its header cannot be decoded"
            ) from None
        except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError) as e:
            raise CorruptImageError(path, f"corrupt {fmt}: {type(e).__name__}: {e}") from None


def _decode_pil(data: bytes, path: str, fmt: str) -> tuple[np.ndarray, XrayInfo]:
    im = _open_pil(io.BytesIO(data), path, fmt)
    info = XrayInfo(im.width, im.height, im.mode, _pil_bit_depth(im, data[:64]), fmt)
    _check_pixels(path, im.width, im.height)
    try:
        im.load()
    except OSError as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or isinstance(e, EOFError):
            raise TruncatedImageError(path, f"truncated {fmt}: {msg}") from None
        raise CorruptImageError(path, f"corrupt {fmt}: {msg}") from None
    except (ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError, MemoryError) as e:
        raise CorruptImageError(path, f"corrupt {fmt}: {type(e).__name__}: {e}") from None
    try:
        return _pil_to_gray(im), info
    except (OSError, ValueError) as e:
        raise UnsupportedImageError(path, f"{fmt} mode {im.mode} cannot be converted to grayscale: {e}") from None


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    """uint8 for 8-bit sources (exact), float32 0..1 for deeper ones."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        la = np.asarray(im.convert("LA"), dtype=np.uint16)
        return ((la[..., 0] * la[..., 1] + 127) // 255).astype(np.uint8)  # composite on black
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if arr.ndim == 3:  # e.g. 16-bit RGB via a TIFF plugin: ITU-R 601-2 luma before stretching
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return _minmax(arr)
    if mode != "L":
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- DICOM


def _first(value: object) -> float:
    try:
        return float(value[0])  # type: ignore[index]
    except TypeError:
        return float(value)  # type: ignore[arg-type]


def _dicom_voi(arr: np.ndarray, ds: object) -> np.ndarray:
    """Modality-rescaled pixels -> float 0..1 through the first VOI transform of the header."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):  # type: ignore[attr-defined]
        return _minmax(apply_voi_lut(arr, ds, index=0, prefer_lut=True))
    if "WindowCenter" in ds and "WindowWidth" in ds:  # type: ignore[operator]
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)  # type: ignore[attr-defined]
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()  # type: ignore[attr-defined]
        x = arr.astype(np.float64, copy=False)
        if func == "SIGMOID" and w > 0:
            return (1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))).astype(np.float32)
        if func == "LINEAR_EXACT" and w > 0:
            return np.clip((x - c) / w + 0.5, 0.0, 1.0).astype(np.float32)
        if w > 1:  # LINEAR, DICOM PS3.3 C.11.2.1.2.1
            return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
    return _minmax(arr)


def _decode_dicom(src: bytes | BinaryIO, path: str, *, header_only: bool = False) -> tuple[np.ndarray | None, XrayInfo]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        fileobj = io.BytesIO(src) if isinstance(src, bytes | bytearray) else src
        ds = pydicom.dcmread(fileobj, force=True, stop_before_pixels=header_only)
    except (InvalidDicomError, EOFError, OSError, ValueError, struct.error, KeyError, IndexError, TypeError) as e:
        raise CorruptImageError(path, f"corrupt DICOM: {type(e).__name__}: {e}") from None
    if not header_only and "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID", "unknown SOP class")
        raise UnsupportedImageError(path, f"DICOM without pixel data ({getattr(sop, 'name', sop)})")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, ValueError, TypeError) as e:
        raise CorruptImageError(path, f"corrupt DICOM: image attributes missing or invalid: {e}") from None
    info = XrayInfo(cols, rows, photometric, bits, "DICOM")
    _check_pixels(path, cols, rows)
    if frames > 1:
        raise UnsupportedImageError(path, f"multi-frame DICOM ({frames} frames); a radiograph has one frame")
    if header_only:
        return None, info
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    tname = getattr(tsyntax, "name", str(tsyntax))
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as e:
        raise UnsupportedImageError(
            path,
            f"DICOM transfer syntax {tname} cannot be decoded with the installed handlers ({e}); "
            "for JPEG-LS / lossless JPEG install pylibjpeg with pylibjpeg-libjpeg, or python-gdcm",
        ) from None
    except (ValueError, EOFError, OSError, struct.error, IndexError, KeyError, TypeError, AttributeError) as e:
        msg = str(e)
        if "length" in msg or "truncat" in msg or "end of" in msg or "less than" in msg:
            raise TruncatedImageError(path, f"truncated DICOM pixel data: {msg}") from None
        raise CorruptImageError(path, f"corrupt DICOM pixel data ({tname}): {type(e).__name__}: {msg}") from None
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise UnsupportedImageError(path, f"DICOM {photometric} pixel array has shape {arr.shape}, not 2-D")
        unit = _dicom_voi(apply_modality_lut(arr, ds), ds)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        return unit, info
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB / YBR (pydicom converts YBR to RGB) / palette
        luma = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if bits <= 8:
            return np.clip(np.round(luma), 0, 255).astype(np.uint8), info
        return _minmax(luma), info
    if arr.ndim == 2:  # PALETTE COLOR without applied LUT or other 2-D data
        return _minmax(arr), info
    raise UnsupportedImageError(path, f"DICOM photometric interpretation {photometric} with shape {arr.shape}")


# ------------------------------------------------------------------------------------------------ public API


def decode_xray(data: bytes, name: str = "<bytes>", dtype: DType = "uint8") -> tuple[np.ndarray, XrayInfo]:
    """The one decode path: ``data`` (a whole file's bytes) -> (2-D grayscale array, :class:`XrayInfo`).

    ``name`` is used in error messages and, for extension-less content, to allow preamble-less DICOM.
    Raises an :class:`ImageReadError` subclass naming ``name`` and the reason.
    """
    dtype = _check_dtype(dtype)
    if len(data) == 0:
        raise EmptyImageError(name, "zero-byte file")
    fmt = sniff_format(data[:132], name)
    if fmt is None:
        raise NotAnImageError(
            name, f"not an image: content is {_describe_non_image(data[:512])}, not one of {SUPPORTED_FORMATS}"
        )
    if fmt == "DICOM":
        img, info = _decode_dicom(data, name)
        assert img is not None  # header_only=False always decodes
    else:
        img, info = _decode_pil(data, name, fmt)
    return _to_dtype(img, dtype), info


def _read_bytes(path: str | Path) -> tuple[bytes, str]:
    p = Path(path)
    try:
        return p.read_bytes(), str(p)
    except FileNotFoundError:
        raise ImageNotFoundError(p, "file not found") from None
    except IsADirectoryError:
        raise NotAnImageError(p, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(p, f"cannot open: {e.strerror or e}") from None


def read_xray(path: str | Path, dtype: DType = "uint8") -> np.ndarray:
    """Read an X-ray file as a 2-D grayscale array: ``uint8`` 0..255 or ``float32`` 0..1 (see module doc)."""
    data, name = _read_bytes(path)
    return decode_xray(data, name, dtype)[0]


def read_xray_bytes(data: bytes, name: str = "<bytes>", dtype: DType = "uint8") -> np.ndarray:
    """Like :func:`read_xray` for in-memory content (an upload); ``name`` appears in error messages."""
    return decode_xray(bytes(data), name, dtype)[0]


def read_xray_with_info(path: str | Path, dtype: DType = "uint8") -> tuple[np.ndarray, XrayInfo]:
    """:func:`read_xray` plus what the file held (size, original mode, bit depth), from the same decode."""
    data, name = _read_bytes(path)
    return decode_xray(data, name, dtype)


def probe_xray(path: str | Path) -> XrayInfo:
    """Size, mode and bit depth from the header only (no pixel decode): cheap, but a file that is truncated
    after its header passes here and fails in :func:`read_xray`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(132)
            if not head:
                raise EmptyImageError(p, "zero-byte file")
            fmt = sniff_format(head, p.name)
            if fmt is None:
                head += f.read(380)
                raise NotAnImageError(
                    p, f"not an image: content is {_describe_non_image(head)}, not one of {SUPPORTED_FORMATS}"
                )
            if fmt == "DICOM":
                f.seek(0)
                return _decode_dicom(f, str(p), header_only=True)[1]
            f.seek(0)
            im = _open_pil(f, str(p), fmt)  # lazy: reads the header only
            info = XrayInfo(im.width, im.height, im.mode, _pil_bit_depth(im, head[:64]), fmt)
            im.close()
            _check_pixels(str(p), info.width, info.height)
            return info
    except FileNotFoundError:
        raise ImageNotFoundError(p, "file not found") from None
    except IsADirectoryError:
        raise NotAnImageError(p, "is a directory, not an image file") from None
    except PermissionError as e:
        raise ImageReadError(p, f"cannot open: {e.strerror or e}") from None
