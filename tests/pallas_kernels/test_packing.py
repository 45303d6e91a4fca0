"""The packed-code layout: bijective, dense, and the documented little-endian bit stream."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import packing


def _bitstream_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pure-Python packing of each row as the module docstring describes it."""
    n = codes.shape[-1]
    out_len = packing.packed_length(n, bits)
    rows = codes.reshape(-1, n)
    out = np.zeros((rows.shape[0], out_len), np.uint8)
    for r, row in enumerate(rows):
        stream = []
        for c in row:
            stream.extend((int(c) >> k) & 1 for k in range(bits))  # LSB first
        stream.extend([0] * (8 * out_len - len(stream)))
        for j in range(out_len):
            out[r, j] = sum(stream[8 * j + k] << k for k in range(8))
    return out.reshape(*codes.shape[:-1], out_len)


@st.composite
def _codes(draw):
    bits = draw(st.sampled_from([2, 3, 4, 6, 8, 1, 5, 7]))
    # a few leading shapes (each new shape compiles) and any last-axis length up to 37
    lead = draw(st.sampled_from([(), (3,), (2, 5)]))
    shape = lead + (draw(st.integers(1, 37)),)
    codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    return bits, codes


# Jitted: one compile per drawn shape instead of one per eager op (4x faster). Integer shifts
# and masks only, so jit and eager give the same bytes; the eager calls (and pack's value
# check, which only runs eagerly) are in the bytes round trip and the tests after it.
_pack = jax.jit(packing.pack, static_argnums=1)
_unpack = jax.jit(packing.unpack, static_argnums=(1, 2))


@settings(max_examples=50, deadline=None)
@given(_codes())
def test_pack_unpack_is_identity(bits_codes):
    bits, codes = bits_codes
    packed = _pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == codes.shape[:-1] + (packing.packed_length(codes.shape[-1], bits),)
    np.testing.assert_array_equal(np.asarray(_unpack(packed, bits, codes.shape[-1])), codes)


@settings(max_examples=30, deadline=None)
@given(_codes())
def test_pack_matches_the_documented_bit_stream(bits_codes):
    bits, codes = bits_codes
    np.testing.assert_array_equal(
        np.asarray(_pack(jnp.asarray(codes), bits)), _bitstream_reference(codes, bits)
    )


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([2, 3, 4, 6, 8]), st.sampled_from([1, 2, 7, 40]))
def test_unpack_pack_is_identity_on_bytes(bits, units):
    # every byte string of whole units is the packing of some codes: the map is a bijection
    codes_per_unit, bytes_per_unit = packing._unit(bits)
    n = units * codes_per_unit
    raw = np.random.default_rng(units).integers(0, 256, (3, units * bytes_per_unit), np.uint8)
    # jitted (a compilation per bits and length, cached across examples) rather than op by op
    roundtrip = jax.jit(lambda r: packing.pack(packing.unpack(r, bits, n), bits))
    np.testing.assert_array_equal(np.asarray(roundtrip(jnp.asarray(raw))), raw)


@pytest.mark.parametrize("bits,n,expected", [(2, 4, 1), (3, 8, 3), (3, 9, 6), (4, 5, 3), (6, 4, 3)])
def test_packing_is_dense(bits, n, expected):
    assert packing.packed_length(n, bits) == expected


def test_pack_works_under_jit_and_vmap():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 8, (4, 5, 24)), jnp.uint8)
    packed = jax.jit(packing.pack, static_argnums=1)(codes, 3)
    np.testing.assert_array_equal(packed, packing.pack(codes, 3))
    unpacked = jax.vmap(lambda p: packing.unpack(p, 3, 24))(packed)
    np.testing.assert_array_equal(unpacked, codes)


def test_bad_packing_input_raises():
    with pytest.raises(ValueError, match="values must lie in"):
        packing.pack(jnp.array([0, 16], jnp.uint8), 4)
    with pytest.raises(TypeError, match="integer array"):
        packing.pack(jnp.array([0.5]), 4)
    with pytest.raises(ValueError, match="bits=9"):
        packing.pack(jnp.array([0], jnp.uint8), 9)
    with pytest.raises(ValueError, match="packed_length"):
        packing.unpack(jnp.zeros((3,), jnp.uint8), 4, 7)
    with pytest.raises(TypeError, match="uint8"):
        packing.unpack(jnp.zeros((4,), jnp.int32), 4, 7)
