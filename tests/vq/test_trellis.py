"""Bitshift trellis quantization (QTIP): the 1MAD code, bit layout, Viterbi optimality against
exhaustive search, tail-biting, and the Gaussian MSE."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.vq import Trellis, trellis
from jaxquant.vq.trellis import (
    STATE_BITS,
    code_table,
    decode,
    encode,
    gaussian_scale,
    one_mad,
    states,
)


def _one_mad_ref(x: np.ndarray) -> np.ndarray:
    y = (x.astype(np.uint64) % 2**32 * 34038481 + 76625530) % 2**32
    s = sum((y >> np.uint64(8 * i)) & np.uint64(255) for i in range(4)).astype(np.float64)
    return (s - 510) / np.sqrt(21845)


def _stream_bits(stream: np.ndarray) -> np.ndarray:
    """uint16 [B, W] -> bits [B, 16 W], most significant bit of each word first."""
    return ((stream[..., None].astype(np.int64) >> np.arange(15, -1, -1)) & 1).reshape(
        stream.shape[0], -1
    )


def _cyclic_states(bits_: np.ndarray, k: int, length: int, state_bits: int) -> np.ndarray:
    """States of streams bits_ [N, k T]: window of state_bits bits ending at (t+1) k, cyclic."""
    t = np.arange(length)[:, None]
    pos = ((t + 1) * k - state_bits + np.arange(state_bits)[None]) % (k * length)  # [T, L]
    return bits_[:, pos] @ (1 << np.arange(state_bits - 1, -1, -1))  # [N, T]


def test_one_mad_matches_a_uint64_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=(7, 1000), dtype=np.uint64)
    got = one_mad(jnp.asarray(x.astype(np.uint32)))
    assert got.dtype == jnp.float32 and got.shape == (7, 1000)
    np.testing.assert_allclose(got, _one_mad_ref(x), rtol=1e-6, atol=1e-6)
    # int32 states are read modulo 2^32.
    np.testing.assert_array_equal(one_mad(jnp.asarray(x.astype(np.uint32).view(np.int32))), got)


def test_code_table_is_one_mad_of_every_state_with_unit_variance():
    table = code_table()
    assert table.dtype == np.float32 and table.shape == (2**STATE_BITS,)
    np.testing.assert_allclose(table, _one_mad_ref(np.arange(2**16)), rtol=1e-6, atol=1e-6)
    assert abs(table.mean()) < 0.01 and abs(table.var() - 1) < 0.01
    np.testing.assert_array_equal(code_table(6), table[:64])


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_states_are_the_cyclic_16_bit_windows_ending_at_each_weight(bits):
    length = 48  # T · k bits = 3k words: windows straddle words for k = 3, 5.
    rng = np.random.default_rng(bits)
    stream = rng.integers(0, 2**16, size=(3, length * bits // 16), dtype=np.uint16)
    got = states(jnp.asarray(stream), bits, length)
    assert got.dtype == jnp.int32 and got.shape == (3, length)
    ref = _cyclic_states(_stream_bits(stream), bits, length, STATE_BITS)
    np.testing.assert_array_equal(got, ref)
    # Tail-biting: rotating the stream by whole words rotates the weights.
    words = bits  # bits words = 16 weights
    rolled = states(jnp.asarray(np.roll(stream, -words, axis=1)), bits, length)
    np.testing.assert_array_equal(rolled, np.roll(got, -16, axis=1))
    scale = 0.7
    np.testing.assert_array_equal(
        decode(jnp.asarray(stream), bits, length, scale=scale), np.float32(scale) * one_mad(got)
    )


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_random_streams_encode_back_exactly(bits):
    # Values on the trellis are encoded with zero error: the stream comes back.
    length = 48
    rng = np.random.default_rng(10 + bits)
    stream = jnp.asarray(rng.integers(0, 2**16, size=(2, length * bits // 16), dtype=np.uint16))
    x = decode(stream, bits, length)
    again = encode(x, bits)
    assert again.dtype == jnp.uint16 and again.shape == stream.shape
    np.testing.assert_array_equal(decode(again, bits, length), x)
    if bits <= 4:
        # Another stream with the same values needs ~L / k consecutive coincidences of the
        # 1MAD value (~1000 distinct values): negligible for k <= 4; at k = 8 (two steps) it
        # happens now and then, so there only the values are compared.
        np.testing.assert_array_equal(again, stream)


def test_encoding_is_a_consistent_tail_biting_path_and_reencodes_to_itself():
    bits, length = 2, 64
    x = jax.random.normal(jax.random.key(0), (5, length))
    stream = encode(x, bits, batch_chunk=2)  # 5 rows in chunks of 2: one padded chunk
    assert stream.shape == (5, length * bits // 16) and stream.dtype == jnp.uint16
    # The Viterbi path is what the stream decodes to (its states satisfy the cyclic recursion).
    table = jnp.float32(gaussian_scale(bits)) * one_mad(jnp.arange(2**16, dtype=jnp.uint32))
    path, cost = trellis._encode_states(x, table, bits=bits, state_bits=16, batch_chunk=2)
    np.testing.assert_array_equal(states(stream, bits, length), path)
    x_hat = decode(stream, bits, length)
    np.testing.assert_allclose(jnp.sum((x - x_hat) ** 2, axis=1), cost, rtol=1e-5)
    # Decoded values lie on the trellis: encoding them gives the same stream, in any chunking.
    np.testing.assert_array_equal(encode(x_hat, bits), stream)
    np.testing.assert_array_equal(encode(x, bits, batch_chunk=5), stream)


# Small trellis for exhaustive search: L = 6 state bits, k = 2, T = 8 (2^16 tail-biting streams).
_L, _K, _T = 6, 2, 8


@functools.cache
def _small_table():
    return np.asarray(code_table(_L), np.float64) * 0.9


def _best_free_start(x: np.ndarray) -> float:
    """min over every path with a free initial state: L + (T − 1) k = 20 bits."""
    n = _L + (_T - 1) * _K
    cand = np.arange(2**n)
    err = np.zeros(2**n)
    for t in range(_T):
        s = (cand >> (n - _L - t * _K)) & (2**_L - 1)
        err += (x[t] - _small_table()[s]) ** 2
    return err.min()


def _tail_biting_errors(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error of every tail-biting stream of k T = 16 bits, and its wrap bits (last L − k)."""
    streams = np.arange(2 ** (_K * _T))
    bits_ = (streams[:, None] >> np.arange(_K * _T - 1, -1, -1)) & 1
    st = _cyclic_states(bits_, _K, _T, _L)
    err = np.sum((x[None] - _small_table()[st]) ** 2, axis=1)
    return err, streams & (2 ** (_L - _K) - 1)


def test_viterbi_equals_exhaustive_search_with_a_free_initial_state():
    x = np.random.default_rng(0).standard_normal((3, _T))
    table = jnp.asarray(_small_table(), jnp.float32)
    path, cost = jax.jit(trellis._viterbi, static_argnums=(2, 3))(
        jnp.asarray(x, jnp.float32), table, _K, _L
    )
    for i in range(3):
        assert float(cost[i]) == pytest.approx(_best_free_start(x[i]), rel=1e-5)
        # The path is a trellis path and achieves its cost.
        p = np.asarray(path[i])
        np.testing.assert_array_equal(p[1:] >> _K, p[:-1] & (2 ** (_L - _K) - 1))
        assert np.sum((x[i] - _small_table()[p]) ** 2) == pytest.approx(float(cost[i]), rel=1e-5)


def test_constrained_viterbi_equals_exhaustive_search_over_tail_biting_streams():
    x = np.random.default_rng(1).standard_normal(_T)
    err, wrap = _tail_biting_errors(x)
    table = jnp.asarray(_small_table(), jnp.float32)
    overlap = jnp.arange(2 ** (_L - _K), dtype=jnp.int32)  # every wrap state, one per row
    xs = jnp.asarray(np.tile(x, (len(overlap), 1)), jnp.float32)
    path, cost = jax.jit(trellis._viterbi, static_argnums=(2, 3))(xs, table, _K, _L, overlap)
    for o in range(len(overlap)):
        assert float(cost[o]) == pytest.approx(err[wrap == o].min(), rel=1e-5)
        p = np.asarray(path[o])
        # Consistent cyclic path: state_t = (state_{t-1} << k | b_t) mod 2^L, t = 0 included.
        np.testing.assert_array_equal(p >> _K, np.roll(p, 1) & (2 ** (_L - _K) - 1))
    # QTIP's two-pass approximation returns a consistent path, optimal among the paths through
    # the wrap state it picked, hence no better than the exhaustive optimum.
    tb_path, tb_cost = trellis._tail_biting(xs[:1], table, _K, _L)
    p = np.asarray(tb_path[0])
    np.testing.assert_array_equal(p >> _K, np.roll(p, 1) & (2 ** (_L - _K) - 1))
    assert float(tb_cost[0]) == pytest.approx(float(cost[p[-1] % 2 ** (_L - _K)]), rel=1e-6)
    assert float(tb_cost[0]) >= err.min() * (1 - 1e-5)


def test_gaussian_mse_at_two_bits():
    # QTIP reports 0.069 for 1MAD with L = 16 at 2 bits; the Shannon bound is 0.0625. The full
    # measurement (2^20 samples) is in BENCHMARKS.md's rate-distortion table.
    assert Trellis(2, 256).gaussian_mse(1 << 14, seed=0) <= 0.072


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: encode(jnp.zeros((2, 64)), 0), "bits"),
        (lambda: encode(jnp.zeros((2, 64)), 9), "bits"),
        (lambda: encode(jnp.zeros((2, 64)), True), "bits"),
        (lambda: encode(jnp.zeros(64), 2), "x"),
        (lambda: encode(jnp.zeros((2, 64), jnp.int32), 2), "x"),
        (lambda: encode(jnp.zeros((2, 12)), 2), "x"),
        (lambda: encode(jnp.zeros((2, 64)), 2, scale=-1.0), "scale"),
        (lambda: encode(jnp.zeros((2, 64)), 2, scale="big"), "scale"),
        (lambda: encode(jnp.zeros((2, 64)), 2, batch_chunk=0), "batch_chunk"),
        (lambda: decode(jnp.zeros((2, 8), jnp.int32), 2, 64), "bitstream"),
        (lambda: decode(jnp.zeros((2, 7), jnp.uint16), 2, 64), "bitstream"),
        (lambda: decode(jnp.zeros((2, 8), jnp.uint16), 2, 60), "length"),
        (lambda: decode(jnp.zeros((2, 8), jnp.uint16), 2, 64, scale=0.0), "scale"),
        (lambda: states(jnp.zeros((2, 8), jnp.uint16), 2, 0), "length"),
        (lambda: one_mad(jnp.zeros(3)), "states"),
        (lambda: code_table(17), "state_bits"),
        (lambda: gaussian_scale(0), "bits"),
        (lambda: Trellis(2, 256).gaussian_mse(100), "num"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(call, match):
    with pytest.raises(ValueError, match=rf"\b{match}\b"):
        call()
