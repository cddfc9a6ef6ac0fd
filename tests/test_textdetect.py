"""Contracts of cxrlab.data.textdetect: planted markers on phantoms are found where they are and unmarked
phantoms stay clean; removal erases what was found and nothing else; real cxr-tiny images carry more text in
COVID19 than in NORMAL."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrlab.data.synth import CLASSES, make_phantom
from cxrlab.data.textdetect import HAS_TEXT_THRESHOLD, TextDetection, detect_text, remove_text
from cxrlab.preprocess import apply_preprocess


def _pair(label: str, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The same phantom with and without its marker (identical pixels elsewhere)."""
    rng = np.random.default_rng(seed)
    state = rng.bit_generator.state
    marked = make_phantom(label, rng, size, marker=True)
    rng.bit_generator.state = state
    clean = make_phantom(label, rng, size, marker=False)
    return marked, clean


@pytest.mark.parametrize("size", [96, 160, 320])
def test_phantom_marker_found_and_clean_phantoms_quiet(size: int) -> None:
    hits, false_pos, covered = 0, 0, []
    n = 0
    for seed in range(6):
        for label in CLASSES:
            marked, clean = _pair(label, seed * 7 + size, size)
            planted = marked != clean
            assert planted.any()
            det = detect_text(marked)
            assert isinstance(det, TextDetection) and det.mask.shape == marked.shape and det.mask.dtype == bool
            hits += det.has_text
            covered.append((det.mask & planted).sum() / planted.sum())
            # every box lies in the marker's corner (the marker is drawn in the top-left quarter)
            for x, y, w, h in det.boxes:
                assert x + w / 2 < size / 2 and y + h / 2 < size / 2, (x, y, w, h)
            c = detect_text(clean)
            false_pos += c.has_text
            assert c.has_text == bool(c.boxes)
            n += 1
    assert hits == n  # recall 1.0 on planted markers
    assert false_pos == 0
    assert np.median(covered) >= 0.8  # the mask covers the marker strokes


def test_scores_and_thresholds() -> None:
    marked, clean = _pair("NORMAL", 3, 128)
    d = detect_text(marked)
    assert d.score >= HAS_TEXT_THRESHOLD and all(s >= HAS_TEXT_THRESHOLD for s in d.box_scores)
    assert len(d.box_scores) == len(d.boxes) >= 1
    assert detect_text(clean).score < HAS_TEXT_THRESHOLD
    # float input in [0, 1] gives the same answer
    df = detect_text(marked.astype(np.float32) / 255.0)
    assert df.has_text and df.boxes == d.boxes
    with pytest.raises(ValueError, match="2-D"):
        detect_text(np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize("mode", ["mask", "inpaint"])
def test_remove_text_erases_marker_only(mode: str) -> None:
    marked, clean = _pair("PNEUMONIA", 11, 128)
    det = detect_text(marked)
    out = remove_text(marked, mode=mode)
    assert out.shape == marked.shape and out.dtype == marked.dtype
    assert not detect_text(out).has_text
    assert np.array_equal(out[~det.mask], marked[~det.mask])  # nothing outside the detected regions changes
    planted = marked != clean
    # the marker's bright strokes are gone: close to the clean image where the marker was
    assert (
        np.abs(out[planted].astype(int) - clean[planted].astype(int)).mean()
        < 0.5 * np.abs(marked[planted].astype(int) - clean[planted].astype(int)).mean()
    )
    # an image without text comes back unchanged; float images keep their dtype and range
    assert np.array_equal(remove_text(clean, mode=mode), clean)
    f = remove_text(marked.astype(np.float32) / 255.0, mode=mode)
    assert f.dtype == np.float32 and f.min() >= 0.0 and f.max() <= 1.0
    with pytest.raises(ValueError, match="mode"):
        remove_text(marked, mode="blur")  # type: ignore[arg-type]


def test_preprocess_hook_uses_remove_text() -> None:
    marked, _ = _pair("COVID19", 5, 128)
    assert np.array_equal(apply_preprocess(marked, None), marked)
    cleaned = apply_preprocess(marked, {"text_removal": "inpaint"})
    assert not detect_text(cleaned).has_text


@pytest.mark.slow
def test_real_text_share_by_class(cxr_tiny: Path) -> None:
    """cxr-tiny (every 10th image): COVID19 images carry more burned-in text than NORMAL ones. NORMAL
    images mostly carry one small laterality 'R' (a real marker, detected too), so the contrast is in text
    beyond a lone marker letter: panel letters, words, arrows."""
    stats = {}
    for label in ("COVID19", "NORMAL"):
        files = sorted((cxr_tiny / label).glob("*.jpg"))[::10]
        dets = [detect_text(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)) for f in files]
        stats[label] = {
            "any": np.mean([d.has_text for d in dets]),
            "multi": np.mean([len(d.boxes) >= 2 for d in dets]),
            "glyphs": np.mean([len(d.boxes) for d in dets]),
        }
    assert stats["COVID19"]["any"] >= 0.4  # letters/arrows on many COVID19 images
    assert stats["NORMAL"]["any"] >= 0.4  # the Kermany 'R'
    assert stats["COVID19"]["multi"] >= stats["NORMAL"]["multi"] + 0.15, stats
    assert stats["COVID19"]["glyphs"] >= 2 * stats["NORMAL"]["glyphs"], stats
