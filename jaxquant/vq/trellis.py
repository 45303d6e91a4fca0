"""Trellis-coded quantization with a bitshift trellis and a computed code (QTIP).

A sequence of T weights is stored as exactly ``bits · T`` bits. Weight t is reconstructed from
the last ``STATE_BITS`` bits of the bitstream read up to (and including) its own bits, through a
hash of that window (no stored codebook). Encoding picks the bitstream whose reconstruction is
nearest to the input with the Viterbi algorithm.

Terminology:
  bits (k):       bits per weight, 1..8. One weight per trellis step (QTIP's V = 1), so each
                  step shifts k new bits into the state.
  state_bits (L): the state is the window of the last L = ``STATE_BITS`` = 16 bits of the
                  bitstream; the trellis has 2^L states, each with 2^k predecessors.
  bitstream:      the k·T bits of one sequence, stored most significant bit first in uint16
                  words: stream bit p is bit ``15 − p mod 16`` of word ``p // 16``. Weight t owns
                  stream bits [t·k, (t+1)·k) (its *symbol* b_t, read big-endian).
  state_t:        the L-bit window of the cyclic bitstream that ends with weight t's bits:
                  stream bits [(t+1)·k − L, (t+1)·k) taken modulo k·T, read big-endian (the
                  newest bit is the least significant). Equivalently
                  ``state_t = ((state_{t−1} << k) | b_t) mod 2^L``.
  tail-biting:    the recursion above is cyclic, ``state_{−1} = state_{T−1}``: the initial state
                  is made of the last L − k bits of the same stream, so no extra bits are
                  stored. A path of states is *consistent* when ``state_0 >> k`` equals the low
                  L − k bits of ``state_{T−1}``.
  1MAD code:      the value of a state: ``y = (a·state + b) mod 2^32`` (a = 34038481,
                  b = 76625530), then the sum s of y's four bytes, centred and scaled to unit
                  variance: ``(s − 510) / √21845`` (510 and 21845 are the mean and variance of
                  the sum of four uniform bytes). The values are close to N(0, 1).
  scale:          reconstructed weight t is ``scale · one_mad(state_t)``.
  Viterbi:        dynamic programming over the trellis: the least squared error of any path
                  ending in each state (the cost-to-go, f32), one step per weight, then a
                  backtrack through the stored argmin predecessors (backpointers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

STATE_BITS = 16

# QTIP's 1MAD constants (Tseng et al., 2024, Sec. 3; the same in the authors' code).
_MAD_A = 34038481
_MAD_B = 76625530
_BYTE_SUM_MEAN = 510  # 4 · 127.5
_BYTE_SUM_STD = 147.800537109375  # f32(√21845), 21845 = 4 · (256² − 1) / 12

# Scales minimizing the MSE of N(0, 1) data. The 1MAD values are lighter-tailed than a Gaussian
# (|value| ≤ 3.45), so from 3 bits on the best scale stretches them past unit variance. Measured
# with ``decode(encode(x, bits, scale=s), bits, 256, scale=s)`` on the samples of
# ``Trellis(bits, 256).gaussian_mse`` (T = 256): a coarse grid (s = 0.74..1.07 in steps
# of 0.03 for k ≤ 3, 1.0..1.6 in steps of 0.06 for k ≥ 4; n = 2^15, seed 0), then steps of 0.01
# (k ≤ 3) or 0.02 (k ≥ 4) around its minimum (n = 2^16, seed 1). The MSE is flat to ~0.5% within
# ±0.03 of these values; where two grid points tied, the middle was kept.
_GAUSSIAN_SCALE = {1: 0.88, 2: 1.00, 3: 1.07, 4: 1.12, 5: 1.16, 6: 1.21, 7: 1.27, 8: 1.35}

# Backpointers take T · 2^(L − k) bytes per sequence; chunks of the batch are sized to stay
# under this budget (the f32 cost-to-go and its temporaries, a few · 2^L · 4 bytes per sequence,
# are much smaller).
_BACKPOINTER_BUDGET = 1 << 30
_MAX_BATCH_CHUNK = 8


def one_mad(states: jax.Array) -> jax.Array:
    """The 1MAD computed code: the value of each trellis state, with no stored codebook.

    ``y = (34038481 · state + 76625530) mod 2^32``; ``one_mad = (Σ bytes(y) − 510) / √21845``.
    The sum of four roughly uniform bytes is close to Gaussian (Irwin–Hall), with mean 510 and
    variance 4 · (256² − 1) / 12 = 21845, so the values have mean ≈ 0 and variance ≈ 1.

    Args:
      states: integer array of any shape (uint32 or int32; read modulo 2^32).

    Returns:
      float32, same shape as ``states``, values in [−3.45, 3.45].

    Example:
      >>> one_mad(jnp.arange(3, dtype=jnp.uint32))
      Array([-1.2516869 , -0.8389686 , -0.42625016], dtype=float32)

    References:
      Tseng, Sun, Hou, De Sa, "QTIP: Quantization with Trellises and Incoherence Processing",
      arXiv:2406.11235, Sec. 3 (computed codes: "1MAD").
    """
    states = jnp.asarray(states)
    if not jnp.issubdtype(states.dtype, jnp.integer):
        raise ValueError(f"one_mad states: expected an integer array, got {states.dtype}.")
    # uint32 arithmetic wraps modulo 2^32, which is the hash.
    y = states.astype(jnp.uint32) * jnp.uint32(_MAD_A) + jnp.uint32(_MAD_B)
    s = (y & 0xFF) + ((y >> 8) & 0xFF) + ((y >> 16) & 0xFF) + (y >> 24)
    return (s.astype(jnp.int32) - _BYTE_SUM_MEAN).astype(jnp.float32) / jnp.float32(_BYTE_SUM_STD)


def code_table(state_bits: int = STATE_BITS) -> np.ndarray:
    """The value of every state, ``one_mad(arange(2^state_bits))``, as a lookup table.

    Args:
      state_bits: L, 1..16.

    Returns:
      float32 numpy array [2^state_bits]; for L = 16, mean ≈ 0 and variance ≈ 1.

    Example:
      >>> code_table().shape
      (65536,)
    """
    _check_state_bits(state_bits, "code_table")
    return np.asarray(one_mad(jnp.arange(1 << state_bits, dtype=jnp.uint32)))


def gaussian_scale(bits: int) -> float:
    """The ``scale`` minimizing the MSE of encoding N(0, 1) data at ``bits`` per weight.

    Measured once per bit width (see ``_GAUSSIAN_SCALE``) on N(0, 1) samples.

    Args:
      bits: k, 1..8.

    Returns:
      float: multiply by the standard deviation of the data to encode.

    Example:
      >>> gaussian_scale(2)
      1.0
    """
    return _GAUSSIAN_SCALE[_check_bits(bits, "gaussian_scale")]


def encode(
    x: jax.Array, bits: int, *, scale: float | None = None, batch_chunk: int | None = None
) -> jax.Array:
    """Tail-biting trellis encoding: the bitstream whose decoding is (nearly) nearest to ``x``.

    Minimizes ``Σ_t (x_t − scale · one_mad(state_t))²`` over bitstreams of k·T bits, whose states
    follow the cyclic recursion of the Terminology block. The exact tail-biting optimum would
    need one Viterbi run per wrap-around state; QTIP's approximation (Algorithm 4) runs two:

    1. Viterbi, with a free initial state, on ``x`` rotated by T/2; its path gives the state at
       the wrap point (weight 0), hence the L − k bits shared by the end and the start.
    2. Viterbi on ``x`` with ``state_0 >> k`` and the low L − k bits of ``state_{T−1}`` both
       fixed to those bits: the optimum among consistent paths through that wrap state.

    Each step keeps the f32 cost-to-go of the 2^L states; the predecessors of state s are the
    states ``j · 2^(L−k) + (s >> k)``, j < 2^k, so the step is a min over a small axis of the
    cost reshaped to [2^k, 2^(L−k)]. Backpointers (T · 2^(L−k) uint8 per sequence) are kept
    for the backtrack, so the batch is processed in chunks of ``batch_chunk`` sequences.

    Args:
      x: float [B, T], one sequence per row. ``T · bits`` must be a multiple of 16 (whole uint16
        words), which also makes the stream at least L = 16 bits long.
      bits: k, bits per weight, 1..8.
      scale: the reconstruction is ``scale · one_mad(state)``; default
        ``gaussian_scale(bits)`` (right for unit-variance data).
      batch_chunk: sequences per Viterbi call; default: 8 (the fastest on CPU), fewer if B is
        smaller or the backpointers of a chunk would pass 1 GiB.

    Returns:
      uint16 [B, T · bits / 16]: the packed bitstreams (layout in the Terminology block).

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (4, 256))
      >>> stream = encode(x, 2)          # [4, 32] uint16: 2 bits per weight
      >>> x_hat = decode(stream, 2, 256)  # MSE ≈ 0.07

    References:
      Tseng, Sun, Hou, De Sa, "QTIP: Quantization with Trellises and Incoherence Processing",
      arXiv:2406.11235, Sec. 3 (bitshift trellis), Algorithm 4 (tail-biting).
      Forney, "The Viterbi algorithm", Proc. IEEE 61(3), 1973.
    """
    bits = _check_bits(bits, "encode")
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"encode x: expected shape [B, T], got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"encode x: expected a float array, got {x.dtype}.")
    batch, length = x.shape
    if length == 0 or (length * bits) % 16:
        raise ValueError(
            f"encode x: T · bits must be a positive multiple of 16 (whole uint16 words), got "
            f"T = {length}, bits = {bits}."
        )
    scale = _check_scale(scale, bits, "encode")
    per_seq = length << (STATE_BITS - bits)
    if per_seq > 2 * _BACKPOINTER_BUDGET:
        raise ValueError(
            f"encode x: T = {length} needs {per_seq / 2**30:.1f} GiB of backpointers per "
            "sequence at this bit width; split the sequences."
        )
    if batch_chunk is None:
        batch_chunk = max(1, min(_MAX_BATCH_CHUNK, batch, _BACKPOINTER_BUDGET // per_seq))
    elif isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int) or batch_chunk < 1:
        raise ValueError(f"encode batch_chunk: expected a positive int, got {batch_chunk!r}.")
    if batch == 0:
        return jnp.zeros((0, length * bits // 16), jnp.uint16)
    table = jnp.float32(scale) * one_mad(jnp.arange(1 << STATE_BITS, dtype=jnp.uint32))
    path, _ = _encode_states(
        x.astype(jnp.float32), table, bits=bits, state_bits=STATE_BITS, batch_chunk=batch_chunk
    )
    return _pack(path & ((1 << bits) - 1), bits)


def states(bitstream: jax.Array, bits: int, length: int) -> jax.Array:
    """The trellis state of every weight: the 16-bit window of the stream ending at its bits.

    ``state_t`` = stream bits [(t+1)·k − 16, (t+1)·k), indices modulo k·T (tail-biting), read
    big-endian. Each window spans at most two uint16 words.

    Args:
      bitstream: uint16 [B, T · bits / 16], as returned by :func:`encode`.
      bits: k, 1..8.
      length: T, the number of weights per sequence.

    Returns:
      int32 [B, T], values in [0, 2^16).

    Example:
      >>> s = states(jnp.array([[0x8000, 0x0001]], jnp.uint16), 2, 16)  # 32 bits, T = 16
      >>> s[0, jnp.array([0, 7, 15])]  # stream bits {30, 31, 0, 1}, [0, 16), [16, 32)
      Array([    6, 32768,     1], dtype=int32)
    """
    bits, length = _check_stream(bitstream, bits, length, "states")
    return _windows(jnp.asarray(bitstream), bits, length, STATE_BITS)


def decode(
    bitstream: jax.Array, bits: int, length: int, *, scale: float | None = None
) -> jax.Array:
    """Reconstruct the weights of a bitstream: ``x̂_t = scale · one_mad(state_t)``.

    Args:
      bitstream: uint16 [B, T · bits / 16], as returned by :func:`encode`.
      bits: k, 1..8.
      length: T, the number of weights per sequence.
      scale: the one used to encode; default ``gaussian_scale(bits)``.

    Returns:
      float32 [B, T].

    Example:
      >>> stream = encode(jax.random.normal(jax.random.key(0), (2, 64)), 4)  # [2, 16] uint16
      >>> decode(stream, 4, 64).shape
      (2, 64)
    """
    bits, length = _check_stream(bitstream, bits, length, "decode")
    scale = _check_scale(scale, bits, "decode")
    return jnp.float32(scale) * one_mad(states(bitstream, bits, length))


# --- Viterbi ----------------------------------------------------------------------------------


def _viterbi(x, table, bits, state_bits, overlap=None):
    """Least-squares path of x [b, T] through the trellis whose state values are ``table``.

    With ``overlap`` [b] (int32, < 2^(L−k)), only paths with ``state_0 >> k == overlap`` and
    ``state_{T−1} mod 2^(L−k) == overlap`` are allowed (the consistent paths through that wrap
    state); without, the initial state is free and the path is not tail-biting.

    Returns (states int32 [b, T], cost f32 [b]).
    """
    b, _ = x.shape
    n_states, n_pred = 1 << state_bits, 1 << bits
    n_rest = n_states >> bits  # 2^(L−k): states sharing a predecessor set
    ids = jnp.arange(n_states, dtype=jnp.int32)

    def err(xt):  # [b] -> [b, 2^L]
        return (xt[:, None] - table[None, :]) ** 2

    cost = err(x[:, 0])
    if overlap is not None:
        cost = jnp.where((ids[None] >> bits) == overlap[:, None], cost, jnp.inf)

    def forward(cost, xt):
        # The predecessors of s are j · 2^(L−k) + (s >> k): axis 1 of the reshape.
        c = cost.reshape(b, n_pred, n_rest)
        best = jnp.argmin(c, axis=1)  # [b, 2^(L−k)]
        low = jnp.min(c, axis=1)  # (a second reduce is faster on CPU than a gather)
        # Successor s = r · 2^k + symbol inherits the cost of its best predecessor set r.
        nxt = jnp.broadcast_to(low[:, :, None], (b, n_rest, n_pred)).reshape(b, n_states)
        return nxt + err(xt), best.astype(jnp.uint8)

    cost, back = lax.scan(forward, cost, x[:, 1:].T)  # back: [T − 1, b, 2^(L−k)]
    if overlap is not None:
        cost = jnp.where((ids[None] & (n_rest - 1)) == overlap[:, None], cost, jnp.inf)
    last = jnp.argmin(cost, axis=1).astype(jnp.int32)

    def backward(s, best):
        r = s >> bits
        j = jnp.take_along_axis(best, r[:, None], axis=1)[:, 0].astype(jnp.int32)
        prev = (j << (state_bits - bits)) | r
        return prev, prev

    _, path = lax.scan(backward, last, back, reverse=True)  # path[t] = state_t, t < T − 1
    return jnp.concatenate([path.T, last[:, None]], axis=1), jnp.min(cost, axis=1)


def _tail_biting(x, table, bits, state_bits):
    """QTIP's Algorithm 4 on x [b, T]: find the wrap state on x rotated by T/2, then Viterbi
    constrained to a consistent path through it. Returns (states [b, T], cost [b])."""
    half = x.shape[1] // 2
    rotated, _ = _viterbi(jnp.roll(x, half, axis=1), table, bits, state_bits)
    # Rotated position `half` is weight 0; its top L − k bits are the wrap bits.
    overlap = rotated[:, half] >> bits
    return _viterbi(x, table, bits, state_bits, overlap)


@functools.partial(jax.jit, static_argnames=("bits", "state_bits", "batch_chunk"))
def _encode_states(x, table, *, bits, state_bits, batch_chunk):
    """Tail-biting paths of x [B, T], ``batch_chunk`` sequences at a time (bounded memory)."""
    batch, length = x.shape
    chunks = -(-batch // batch_chunk)
    xs = jnp.pad(x, ((0, chunks * batch_chunk - batch), (0, 0)))
    path, cost = lax.map(
        lambda xc: _tail_biting(xc, table, bits, state_bits),
        xs.reshape(chunks, batch_chunk, length),
    )
    return path.reshape(-1, length)[:batch], cost.reshape(-1)[:batch]


# --- Bit packing ------------------------------------------------------------------------------


def _pack(symbols, bits):
    """Symbols [B, T] (k bits each) -> uint16 [B, T · k / 16], most significant bit first."""
    batch, length = symbols.shape
    shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)
    stream = (symbols[:, :, None] >> shifts) & 1  # [B, T, k] -> stream bits [B, T · k]
    words = stream.reshape(batch, -1, 16).astype(jnp.uint32)
    weights = jnp.uint32(1) << jnp.arange(15, -1, -1, dtype=jnp.uint32)
    return jnp.sum(words * weights, axis=-1).astype(jnp.uint16)


def _windows(bitstream, bits, length, width):
    """The ``width``-bit (≤ 16) window of each cyclic stream ending at bit (t+1)·k, t < T."""
    words = bitstream.astype(jnp.uint32)
    n_words = words.shape[1]
    end = (jnp.arange(length, dtype=jnp.int32) + 1) * bits
    q, r = end // 16, (end % 16).astype(jnp.uint32)
    # The window lies in the 32 bits of words q − 1 and q (cyclically): it ends r bits into q.
    pair = (words[:, (q - 1) % n_words] << 16) | words[:, q % n_words]
    return ((pair >> (16 - r)) & ((1 << width) - 1)).astype(jnp.int32)


# --- Argument checks --------------------------------------------------------------------------


def _check_bits(bits, where):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"{where} bits: expected an int in 1..8, got {bits!r}.")
    return int(bits)


def _check_state_bits(state_bits, where):
    if (
        isinstance(state_bits, bool)
        or not isinstance(state_bits, (int, np.integer))
        or not 1 <= state_bits <= 16
    ):
        raise ValueError(f"{where} state_bits: expected an int in 1..16, got {state_bits!r}.")


def _check_scale(scale, bits, where):
    if scale is None:
        return _GAUSSIAN_SCALE[bits]
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{where} scale: expected a positive float, got {scale!r}.") from None
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where} scale: expected a positive finite float, got {scale!r}.")
    return scale


def _check_stream(bitstream, bits, length, where):
    bits = _check_bits(bits, where)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"{where} length: expected a positive int, got {length!r}.")
    if (length * bits) % 16:
        raise ValueError(
            f"{where} length: T · bits must be a multiple of 16, got T = {length}, bits = {bits}."
        )
    bitstream = jnp.asarray(bitstream)
    if bitstream.dtype != jnp.uint16:
        raise ValueError(f"{where} bitstream: expected uint16, got {bitstream.dtype}.")
    if bitstream.ndim != 2 or bitstream.shape[1] != length * bits // 16:
        raise ValueError(
            f"{where} bitstream: expected shape [B, {length * bits // 16}] for T = {length}, "
            f"bits = {bits}, got {bitstream.shape}."
        )
    return bits, int(length)
