"""The bundled image dataset: 8x8 handwritten digits, for small CNNs (``digits/README.md``)."""

from __future__ import annotations

import functools
import gzip
import importlib.resources

import numpy as np

IMAGE_SPLITS = ("train", "test")
NUM_TEST_DIGITS = 360


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    raw = importlib.resources.files("jaxquant.data").joinpath("digits/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",")
    return table[:, :64].astype(np.uint8), table[:, 64].astype(np.int32)


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split of the bundled digits.

    Args:
      split: ``'train'`` (1,437 images) or ``'test'`` (360); a fixed permutation (seed 0) of
        the 1,797 images makes the split.

    Returns:
      float32 ``[N, 8, 8, 1]`` images in ``[0, 1]`` (pixel counts / 16, channels last as
      ``nn.Conv`` takes them) and int32 ``[N]`` labels 0..9.
    """
    if split not in IMAGE_SPLITS:
        raise ValueError(f"load_digits split={split!r}: expected one of {IMAGE_SPLITS}.")
    pixels, labels = _digits()
    order = np.random.default_rng(0).permutation(len(labels))
    part = order[NUM_TEST_DIGITS:] if split == "train" else order[:NUM_TEST_DIGITS]
    images = pixels[part].reshape(-1, 8, 8, 1).astype(np.float32) / 16.0
    return images, labels[part]
