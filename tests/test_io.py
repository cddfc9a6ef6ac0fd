"""Contracts of the X-ray reader: formats, conversion rules, DICOM display pipeline, specific errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from cxrlab.data.io import (
    CorruptImageError,
    EmptyImageError,
    ImageNotFoundError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
    XrayInfo,
    decode_xray,
    probe_xray,
    read_xray,
    read_xray_bytes,
)
from cxrlab.errors import CxrlabError

RNG = np.random.default_rng(0)
GRAY = (RNG.random((48, 64)) * 255).astype(np.uint8)


def _save(path: Path, img: Image.Image, fmt: str | None = None) -> Path:
    img.save(path, format=fmt)
    return path


def _png_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


# ------------------------------------------------------------------------------------------ raster formats


def test_gray8_png_roundtrip_and_float(tmp_path: Path) -> None:
    p = _save(tmp_path / "g.png", Image.fromarray(GRAY))
    out = read_xray(p)
    assert out.dtype == np.uint8 and out.shape == GRAY.shape
    np.testing.assert_array_equal(out, GRAY)
    f = read_xray(p, dtype="float32")
    assert f.dtype == np.float32 and f.min() >= 0.0 and f.max() <= 1.0
    np.testing.assert_allclose(f, GRAY / 255.0, atol=1e-6)
    assert probe_xray(p) == XrayInfo(64, 48, "L", 8, "PNG")


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("TIFF", ".tif")])
def test_16bit_minmax_stretch(tmp_path: Path, fmt: str, suffix: str) -> None:
    a = (1000 + RNG.random((40, 50)) * 3000).astype(np.uint16)
    p = _save(tmp_path / f"g16{suffix}", Image.fromarray(a), fmt)
    info = probe_xray(p)
    assert (info.width, info.height, info.bit_depth, info.format) == (50, 40, 16, fmt)
    assert info.mode.startswith("I;16")
    out = read_xray(p)
    assert out.dtype == np.uint8
    assert out.flat[a.argmin()] == 0 and out.flat[a.argmax()] == 255  # darkest -> 0, brightest -> 255
    expected = (a.astype(np.float64) - a.min()) / (a.max() - a.min())
    np.testing.assert_allclose(read_xray(p, dtype="float32"), expected, atol=1e-6)  # float keeps 16-bit precision
    np.testing.assert_array_equal(out, np.round(expected * 255).astype(np.uint8))


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 15:, 3] = 255  # right half opaque, left half transparent
    rgba[:, :15, 3] = 0
    p = _save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"))
    out = read_xray(p)
    assert (out[:, :15] == 0).all() and (out[:, 15:] == 200).all()
    assert probe_xray(p).mode == "RGBA"


def test_half_alpha_scales_gray(tmp_path: Path) -> None:
    la = np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), 128, np.uint8)], -1)
    p = _save(tmp_path / "la.png", Image.fromarray(la, "LA"))
    assert abs(int(read_xray(p)[0, 0]) - round(200 * 128 / 255)) <= 1


def test_palette_and_rgb_bmp_and_jpeg(tmp_path: Path) -> None:
    rgb = np.stack([GRAY, GRAY // 2, 255 - GRAY], -1)
    im = Image.fromarray(rgb, "RGB")
    pal = im.quantize(16)
    p_pal = _save(tmp_path / "p.png", pal)
    np.testing.assert_array_equal(read_xray(p_pal), np.asarray(pal.convert("L")))
    assert probe_xray(p_pal).mode == "P"
    p_bmp = _save(tmp_path / "c.bmp", im)
    np.testing.assert_array_equal(read_xray(p_bmp), np.asarray(im.convert("L")))  # ITU-R 601-2 luma
    assert probe_xray(p_bmp).format == "BMP"
    p_jpg = _save(tmp_path / "g.jpg", Image.fromarray(GRAY), "JPEG")
    assert np.abs(read_xray(p_jpg).astype(int) - GRAY).mean() < 20
    assert probe_xray(p_jpg) == XrayInfo(64, 48, "L", 8, "JPEG")


def test_content_sniffed_not_extension(tmp_path: Path) -> None:
    png_named_jpg = tmp_path / "really_png.jpg"
    png_named_jpg.write_bytes(_png_bytes(GRAY))
    np.testing.assert_array_equal(read_xray(png_named_jpg), GRAY)
    assert probe_xray(png_named_jpg).format == "PNG"
    no_ext = tmp_path / "noext"
    no_ext.write_bytes(_png_bytes(GRAY))
    np.testing.assert_array_equal(read_xray(no_ext), GRAY)


def test_bytes_and_file_share_one_path(tmp_path: Path) -> None:
    data = _png_bytes(GRAY)
    (tmp_path / "x.png").write_bytes(data)
    np.testing.assert_array_equal(read_xray_bytes(data, "upload.png"), read_xray(tmp_path / "x.png"))
    img, info = decode_xray(data, "upload.png", "float32")
    assert img.dtype == np.float32 and info.width == 64


def test_bad_dtype_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        read_xray_bytes(_png_bytes(GRAY), dtype="int16")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def rg1() -> tuple[np.ndarray, np.ndarray]:
    """(cxrlab output, raw stored pixels) of the real CR chest radiograph (MONOCHROME1, 15-bit)."""
    p = get_testdata_file("RG1_UNCR.dcm")
    return read_xray(p), pydicom.dcmread(p).pixel_array


def test_dicom_monochrome1_inverted(rg1: tuple[np.ndarray, np.ndarray]) -> None:
    out, raw = rg1
    assert out.shape == (1955, 1841) and out.dtype == np.uint8
    # MONOCHROME1: high stored values are displayed dark, so the output must anti-correlate with them
    assert np.corrcoef(out.ravel()[::97].astype(float), raw.ravel()[::97].astype(float))[0, 1] < -0.95
    # anatomy: the lung fields (left/right thirds of the middle band) are darker than the mediastinum
    h, w = out.shape
    band = out[h // 3 : 2 * h // 3]
    lungs = (band[:, w // 6 : w // 3].mean() + band[:, 2 * w // 3 : 5 * w // 6].mean()) / 2
    mediastinum = band[:, 9 * w // 20 : 11 * w // 20].mean()
    assert mediastinum > lungs + 20


def test_dicom_jpeg2000_lossless_matches_uncompressed(rg1: tuple[np.ndarray, np.ndarray]) -> None:
    p = get_testdata_file("RG1_J2KR.dcm")
    np.testing.assert_array_equal(read_xray(p), rg1[0])
    assert probe_xray(p) == XrayInfo(1841, 1955, "MONOCHROME1", 15, "DICOM")


def _write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", **tags: object) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_window_and_rescale_applied(tmp_path: Path) -> None:
    a = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (10, 1))  # 10 x 100 ramp
    # rescale to -1000..2960; window 1000 +- 500 (in rescaled units) -> stored 1500..2500
    p = _write_dicom(tmp_path / "w.dcm", a, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=1001)
    out = read_xray(p, dtype="float32")
    rescaled = a.astype(float) - 1000
    assert (out[rescaled <= 500] == 0).all() and (out[rescaled >= 1500] == 1).all()
    mid = (rescaled > 520) & (rescaled < 1480)
    np.testing.assert_allclose(out[mid], (rescaled[mid] - 999.5) / 1000 + 0.5, atol=1e-6)


def test_dicom_monochrome1_is_inverse_of_monochrome2(tmp_path: Path) -> None:
    a = (RNG.random((16, 16)) * 4095).astype(np.uint16)
    m2 = read_xray(_write_dicom(tmp_path / "m2", a, "MONOCHROME2"), dtype="float32")  # no extension: sniffed
    m1 = read_xray(_write_dicom(tmp_path / "m1.dcm", a, "MONOCHROME1"), dtype="float32")
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2.flat[a.argmax()] == 1.0  # no window: min-max


# --------------------------------------------------------------------------------------------------- errors


def _assert_error(err: ImageReadError, path: Path | str, fragment: str) -> None:
    assert isinstance(err, CxrlabError)
    assert err.path == str(path) and str(path) in str(err)
    assert fragment in err.reason and err.reason in str(err)


def test_zero_byte(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.touch()
    with pytest.raises(EmptyImageError) as ei:
        read_xray(p)
    _assert_error(ei.value, p, "zero-byte")
    with pytest.raises(EmptyImageError):
        probe_xray(p)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    b = io.BytesIO()
    Image.fromarray(GRAY).save(b, format=fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    with pytest.raises(TruncatedImageError) as ei:
        read_xray(p)
    _assert_error(ei.value, p, "truncated")
    assert probe_xray(p).width == 64  # the header is intact: probe does not decode pixels


def test_truncated_dicom() -> None:
    data = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    with pytest.raises(TruncatedImageError, match="truncated DICOM"):
        read_xray_bytes(data[: len(data) // 2], "half.dcm")


def test_text_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(NotAnImageError) as ei:
        read_xray(p)
    _assert_error(ei.value, p, "text file")
    with pytest.raises(NotAnImageError):
        probe_xray(p)


def test_corrupt_jpeg(tmp_path: Path) -> None:
    b = io.BytesIO()
    Image.fromarray(GRAY).save(b, format="JPEG")
    junk = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    p = tmp_path / "bad.jpg"
    p.write_bytes(b.getvalue()[:300] + junk)  # JPEG signature, garbage tables
    with pytest.raises(CorruptImageError) as ei:
        read_xray(p)
    _assert_error(ei.value, p, "corrupt JPEG")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb(tmp_path: Path) -> None:
    # 100k x 100k pixels declared in 100 bytes: rejected from the header, before any allocation
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    p = tmp_path / "bomb.png"
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )
    with pytest.raises(ImageTooLargeError) as ei:
        read_xray(p)
    _assert_error(ei.value, p, "decompression bomb")
    with pytest.raises(ImageTooLargeError):
        probe_xray(p)


def test_pillow_warning_range_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # between MAX_IMAGE_PIXELS and twice it Pillow only warns; that is an error here too (images and DICOM)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    p = _save(tmp_path / "g.png", Image.fromarray(GRAY))  # 3072 pixels
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS|decompression bomb"):
        read_xray(p)
    with pytest.raises(ImageTooLargeError):
        read_xray(get_testdata_file("RG1_UNCR.dcm"))


def test_unsupported_dicom_without_pixels(tmp_path: Path) -> None:
    p = get_testdata_file("rtplan.dcm")
    with pytest.raises(UnsupportedImageError, match="without pixel data"):
        read_xray(p)


def test_unsupported_multiframe() -> None:
    with pytest.raises(UnsupportedImageError, match="multi-frame"):
        read_xray(get_testdata_file("SC_rgb_rle_2frame.dcm"))


def test_not_found_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError) as ei:
        read_xray(tmp_path / "nope.png")
    _assert_error(ei.value, tmp_path / "nope.png", "not found")
    with pytest.raises(NotAnImageError, match="directory"):
        read_xray(tmp_path)
