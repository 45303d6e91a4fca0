"""The bundled digits: shapes, ranges, and a fixed, disjoint split of the 1,797 images."""

import gzip
import importlib.resources

import numpy as np
import pytest

from jaxquant.data import IMAGE_SPLITS, load_digits
from jaxquant.data.images import NUM_TEST_DIGITS


def test_digits_splits_are_disjoint_fixed_and_cover_the_file():
    raw = importlib.resources.files("jaxquant.data").joinpath("digits/digits.csv.gz")
    rows = gzip.decompress(raw.read_bytes()).decode().splitlines()
    assert len(rows) == 1797
    table = np.array([[int(v) for v in r.split(",")] for r in rows])  # independent parse
    seen = []
    for split in IMAGE_SPLITS:
        images, labels = load_digits(split)
        n = NUM_TEST_DIGITS if split == "test" else 1797 - NUM_TEST_DIGITS
        assert images.shape == (n, 8, 8, 1) and images.dtype == np.float32
        assert labels.shape == (n,) and set(labels.tolist()) == set(range(10))
        assert images.min() == 0.0 and images.max() == 1.0
        seen += [tuple(r) for r in np.c_[np.rint(images.reshape(n, 64) * 16), labels]]
        again, _ = load_digits(split)
        np.testing.assert_array_equal(images, again)
    assert sorted(seen) == sorted(tuple(r) for r in table)  # every row once
    with pytest.raises(ValueError, match="split='validation'"):
        load_digits("validation")
