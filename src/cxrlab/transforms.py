"""Image transforms: one deterministic eval list; training adds random ops after the resize.

Input to every transform is the 2-D 8-bit grayscale image that ``cxrlab.data.io.read_xray`` returns (after the
bundle's ``cxrlab.preprocess``); the list resizes it (the head that training's image cache stores, see
:func:`split_cached`), then makes it ``in_chans`` wide (``ToChannels``). Grayscale is replicated to 3 channels by
default (``in_chans=3``) so ImageNet-pretrained stems are used unchanged; ``in_chans=1`` builds the model with a
1-channel stem (timm sums the pretrained RGB filters) and uses the mean of the RGB normalisation constants.
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


class ToChannels(A.ImageOnlyTransform):
    """HxW (or HxWx1) uint8 grayscale -> HxWxC (C = ``in_chans``, see :func:`to_channels`); an image that already
    has ``in_chans`` channels passes unchanged."""

    def __init__(self, in_chans: int = 3, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.in_chans = in_chans

    def apply(self, img: np.ndarray, **params: object) -> np.ndarray:
        if img.ndim == 3 and img.shape[2] == self.in_chans:
            return img
        return to_channels(img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img, self.in_chans)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("in_chans",)


def cached_ops(img_size: tuple[int, int]) -> list[A.BasicTransform]:
    """The deterministic head of every transform list, on the 2-D gray image: Resize (INTER_AREA). Its output is
    what training's decoded-image cache stores (:func:`split_cached`), so the resize runs once per image and run."""
    h, w = img_size
    return [A.Resize(height=h, width=w, interpolation=cv2.INTER_AREA)]


def _compose(
    img_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int | None,
    random: Sequence[A.BasicTransform] = (),
    seed: int | None = None,
) -> A.Compose:
    chans = in_chans if in_chans is not None else len(mean)
    tail = [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose([*cached_ops(img_size), ToChannels(chans), *random, *tail], seed=seed)


def eval_transform(
    img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], in_chans: int | None = None
) -> A.Compose:
    """Resize -> ToChannels -> Normalize -> ToTensorV2: the whole preprocessing used by validation, test and
    inference, on the 2-D uint8 gray image (an image already made ``in_chans`` wide by :func:`to_channels` works
    too). ``in_chans``: default one channel per ``mean`` value."""
    return _compose(img_size, mean, std, in_chans)


def split_cached(transform: A.Compose) -> tuple[A.Compose, A.Compose]:
    """(head, rest) of a transform list made here: ``head`` is its :func:`cached_ops` prefix (deterministic, on the
    gray image: what a cache stores), ``rest`` everything after it (channels, random ops, normalisation), to run per
    item on the cached image. ``rest(head(x))`` is ``transform(x)``, random draws included: the ops of ``head``
    draw no random numbers (p = 1)."""
    ops = list(transform.transforms)
    k = 0
    while k < len(ops) and isinstance(ops[k], A.Resize):
        k += 1
    return A.Compose(ops[:k]), A.Compose(ops[k:], seed=transform.seed)


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
    img_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    aug: AugmentConfig,
    seed: int | None = None,
    in_chans: int | None = None,
) -> A.Compose:
    """The eval transform with ``random_ops`` inserted after the resize: Resize -> ToChannels -> HorizontalFlip ..."""
    return _compose(img_size, mean, std, in_chans, random_ops(aug), seed)
