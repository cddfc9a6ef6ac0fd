"""Image transforms: one deterministic eval list; training adds random ops after the resize.

Input to every transform is an HxWxC uint8 array made by ``to_channels`` from the 8-bit grayscale image
that ``cxrlab.data.io.read_xray`` returns. Grayscale is replicated to 3 channels by default (``in_chans=3``)
so ImageNet-pretrained stems are used unchanged; ``in_chans=1`` builds the model with a 1-channel stem
(timm sums the pretrained RGB filters) and uses the mean of the RGB normalisation constants.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from cxrlab.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def norm_constants(
    in_chans: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for ``in_chans`` channels from a model's (usually 3-channel) constants."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if in_chans == len(mean):
        return mean, std
    if in_chans == 1:
        return (float(np.mean(mean)),), (float(np.mean(std)),)
    raise ValueError(f"cannot adapt {len(mean)}-channel normalisation to in_chans={in_chans}")


def to_channels(gray: np.ndarray, in_chans: int) -> np.ndarray:
    """HxW uint8 grayscale -> HxWxC uint8 (C = in_chans)."""
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    if in_chans == 1:
        return gray[:, :, None]
    return np.repeat(gray[:, :, None], in_chans, axis=2)


def resize_gray(gray: np.ndarray, img_size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D image to (height, width) exactly as the transforms' Resize does (INTER_AREA both ways).

    Must stay bit-identical to ``eval_transform``'s Resize: training caches images resized by this function
    while inference resizes with the transform, so any difference here is train/inference drift.
    """
    h, w = img_size
    if gray.shape[:2] == (h, w):
        return gray
    return cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)


def _deterministic(
    img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> tuple[list[A.BasicTransform], list[A.BasicTransform]]:
    h, w = img_size
    head = [A.Resize(height=h, width=w, interpolation=cv2.INTER_AREA)]
    tail = [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return head, tail


def eval_transform(img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Resize -> Normalize -> ToTensorV2: the whole preprocessing used by validation, test and inference."""
    head, tail = _deterministic(img_size, mean, std)
    return A.Compose([*head, *tail])


def random_ops(aug: AugmentConfig) -> list[A.BasicTransform]:
    """The random training-only ops the config asks for (the seed used HorizontalFlip alone)."""
    ops: list[A.BasicTransform] = []
    if aug.hflip_p > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip_p))
    if aug.scale != (1.0, 1.0) or aug.rotate_limit > 0:
        ops.append(
            A.Affine(
                scale=aug.scale,
                rotate=(-aug.rotate_limit, aug.rotate_limit),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=aug.p,
            )
        )
    if aug.brightness > 0 or aug.contrast > 0:
        ops.append(A.RandomBrightnessContrast(brightness_limit=aug.brightness, contrast_limit=aug.contrast, p=aug.p))
    return ops


def train_transform(
    img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], aug: AugmentConfig, seed: int | None = None
) -> A.Compose:
    """The eval transform with ``random_ops`` inserted after the resize: Resize -> HorizontalFlip -> ... ."""
    head, tail = _deterministic(img_size, mean, std)
    return A.Compose([*head, *random_ops(aug), *tail], seed=seed)
