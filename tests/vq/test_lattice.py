"""D8 / E8 nearest-point decoders against brute-force search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.vq import nearest_d8, nearest_e8

_OFFSETS = np.array(list(itertools.product([-1, 0, 1], repeat=8)), np.float64)  # 6561


def _brute_force(x: np.ndarray, lattice: str) -> np.ndarray:
    """Nearest point by exhaustive search over every candidate within one step of the
    coordinate-wise rounding (any nearest point of D8/E8 lies there: its coordinates are
    within 1 of x's)."""
    cands = [np.floor(x + 0.5) + _OFFSETS]
    if lattice == "e8":
        cands.append(np.floor(x) + 0.5 + _OFFSETS)
    c = np.concatenate(cands)
    ints = np.all(c == np.round(c), axis=1)
    even = np.round(np.sum(c - np.where(ints, 0.0, 0.5)[:, None], axis=1)) % 2 == 0
    c = c[even]
    d = np.sum((c - x) ** 2, axis=1)
    return c[np.argmin(d)], np.min(d)


@pytest.mark.parametrize("lattice, decode", [("d8", nearest_d8), ("e8", nearest_e8)])
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_decoders_find_the_nearest_point_by_brute_force(lattice, decode, scale):
    rng = np.random.default_rng(int(scale * 10) + len(lattice))
    x = rng.standard_normal((64, 8)) * scale
    got = np.asarray(jax.jit(decode)(jnp.asarray(x, jnp.float32)), np.float64)
    for xi, pi in zip(x, got, strict=True):
        ref, dist = _brute_force(xi, lattice)
        # Same distance (ties may pick a different point of equal distance).
        assert np.sum((pi - xi) ** 2) == pytest.approx(dist, rel=1e-5, abs=1e-6), (xi, pi, ref)
        # The result is a lattice point.
        if np.all(pi == np.round(pi)):
            assert np.sum(pi) % 2 == 0
        else:
            assert lattice == "e8" and np.all(pi - 0.5 == np.round(pi - 0.5))
            assert np.sum(pi - 0.5) % 2 == 0


def test_e8_decoder_on_batches_and_lattice_points():
    # Lattice points decode to themselves; shapes [..., 8] are kept.
    pts = np.array([[2, 0, 0, 0, 0, 0, 0, 0], [0.5] * 8, [-1.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(nearest_e8(jnp.asarray(pts, jnp.float32)), pts)
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    assert nearest_e8(x).shape == (3, 5, 8)
    # Quantization MSE of E8 at unit density: the lattice's normalized second moment,
    # G(E8) = 0.0716821 (Conway & Sloane, Table 2.3), here on points uniform over many cells.
    u = jax.random.uniform(jax.random.key(1), (200_000, 8), minval=0, maxval=8)
    mse = float(jnp.mean(jnp.sum((u - nearest_e8(u)) ** 2, axis=-1))) / 8
    # E8's cell has volume 1, so G = mse / vol^(2/8) = mse.
    assert mse == pytest.approx(0.0716821, rel=0.01)


@pytest.mark.parametrize(
    "decode, x, match",
    [
        (nearest_e8, jnp.zeros((4, 7)), "8"),
        (nearest_d8, jnp.zeros((4, 1)), "n >= 2"),
        (nearest_d8, jnp.zeros((4, 8), jnp.int32), "float"),
    ],
)
def test_bad_shapes_raise(decode, x, match):
    with pytest.raises(ValueError, match=match):
        decode(x)
