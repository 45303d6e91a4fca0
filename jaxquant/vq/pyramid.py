"""Pyramid vector quantization (Fischer's PVQ) as a shape-gain quantizer, as in PVQ for LLMs.

A vector ``x`` [n] is stored as a point ``y`` of the integer pyramid (its direction) and a gain
(its length along that direction): ``x ≈ gain · y / ||y||_2``. The pyramid is never stored: a
point is kept as its index in an enumeration computed arithmetically from a small table of
counts, and decoded the same way.

Terminology:
  pyramid P(n, K): the integer vectors y ∈ Z^n with ||y||_1 = K (K "pulses").
  V(n, K):         the number of points of P(n, K), i.e. of shape codewords.
  shape:           the unit vector u = y / ||y||_2 of a pyramid point.
  gain:            the scalar g ≥ 0 with x ≈ g·u; given u the best one is g = <x, u>.
  index:           uint32 in [0, V(n, K)): a point's position in the enumeration below.
  gain_code:       uint8 in [0, 2**gain_bits): the index of a level of the gain codebook.
  count table:     V(m, j) for 0 ≤ m ≤ n, 0 ≤ j ≤ K, the only table encode/decode need.

Enumeration (a variant of Fischer's 1986 enumeration): points of P(m, j) are
ordered by their first coordinate in the order 0, +1, −1, +2, −2, …, +j, −j, and points with
the same first coordinate t by the enumeration of their tail in P(m − 1, j − |t|). The block
of first coordinate ±t holds V(m − 1, j − |t|) points, so the index is a sum of block offsets,
one per coordinate.

Rates: the shape costs log2 V(n, K) bits with an ideal index coder and ⌈log2 V(n, K)⌉ bits as
a fixed-length index; the gain costs ``gain_bits``; both are shared by the n weights.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

# Gain codebooks are designed on this many N(0, I_n) vectors drawn from this seed (chosen
# apart from the default seed of ``PyramidVQ.gaussian_mse``, so that the reported MSE is out of
# sample).
_GAIN_DESIGN_SAMPLES = 2**16
_GAIN_DESIGN_SEED = 20241022
_GAIN_METHODS = ("lloyd_max", "quantile")


def _int_arg(value, name: str, fn: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{fn} {name}: expected an int, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{fn} {name}: expected an int, got {value!r}.") from None
    if value < minimum:
        raise ValueError(f"{fn} {name}: expected {name} >= {minimum}, got {value}.")
    return value


def _float_vectors(x, fn: str, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{fn} {name}: expected shape [..., n] with n >= 1, got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn} {name}: expected a float array, got {x.dtype}.")
    return x


@functools.cache
def _counts(n: int, k: int) -> tuple[tuple[int, ...], ...]:
    # V(m, j) as exact Python ints, rows m = 0..n, columns j = 0..k.
    v = [[1] + [0] * k]
    for m in range(1, n + 1):
        row = [1]
        for j in range(1, k + 1):
            row.append(v[m - 1][j] + v[m - 1][j - 1] + row[j - 1])
        v.append(row)
    return tuple(tuple(row) for row in v)


def pvq_count(n: int, k: int) -> int:
    """The number V(n, K) of integer vectors of dimension n and L1 norm exactly K.

    The recursion on the last coordinate (0, or ±1 and one pulse fewer, or one pulse moved):

      V(n, K) = V(n−1, K) + V(n−1, K−1) + V(n, K−1),   V(n, 0) = 1,   V(0, K>0) = 0.

    Args:
      n: dimension, ≥ 1.
      k: number of pulses K, ≥ 0.

    Returns:
      V(n, K) as an exact Python int.

    Example:
      >>> pvq_count(8, 4)   # 4 pulses in 8 dimensions
      2816

    References:
      T. R. Fischer, "A pyramid vector quantizer", IEEE Trans. Inf. Theory 32(4), 1986.
    """
    n = _int_arg(n, "n", "pvq_count", 1)
    k = _int_arg(k, "k", "pvq_count", 0)
    return _counts(n, k)[n][k]


def pvq_count_closed_form(n: int, k: int) -> int:
    """V(n, K) by counting supports: ``Σ_i 2^i · C(n, i) · C(K−1, i−1)`` for K ≥ 1.

    A point with i nonzero coordinates picks their positions (C(n, i)), their signs (2^i) and
    a composition of K into i positive parts (C(K−1, i−1)).

    Args:
      n: dimension, ≥ 1.
      k: number of pulses K, ≥ 1.

    Returns:
      V(n, K) as an exact Python int; equals :func:`pvq_count`.

    Example:
      >>> pvq_count_closed_form(8, 4)
      2816

    References:
      T. R. Fischer, "A pyramid vector quantizer", IEEE Trans. Inf. Theory 32(4), 1986.
    """
    n = _int_arg(n, "n", "pvq_count_closed_form", 1)
    k = _int_arg(k, "k", "pvq_count_closed_form", 1)
    return sum(2**i * math.comb(n, i) * math.comb(k - 1, i - 1) for i in range(1, min(n, k) + 1))


def count_table(n: int, k: int) -> np.ndarray:
    """The table of V(m, j) for 0 ≤ m ≤ n, 0 ≤ j ≤ K that encoding and decoding read.

    Args:
      n: dimension, ≥ 1.
      k: number of pulses K, ≥ 0.

    Returns:
      int64 [n + 1, k + 1] with ``table[m, j] = V(m, j)``.

    Raises:
      ValueError: if V(n, K) does not fit an int64.

    Example:
      >>> count_table(2, 2)
      array([[1, 0, 0],
             [1, 2, 2],
             [1, 4, 8]])
    """
    n = _int_arg(n, "n", "count_table", 1)
    k = _int_arg(k, "k", "count_table", 0)
    v = _counts(n, k)
    if v[n][k] >= 2**63:
        raise ValueError(f"count_table n, k: V({n}, {k}) = {v[n][k]} does not fit an int64.")
    return np.array(v, np.int64)


@functools.cache
def _enumeration_tables(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    # counts[m, j] = V(m, j). starts[m, j, t] = first index of the block of P(m, j) whose first
    # coordinate is +t (t ≥ 1): after the V(m−1, j) points starting with 0 and both signs of
    # each smaller magnitude; starts[m, j, 0] = 0, and starts[m, j, t > j] = V(m, j), past the
    # end, so that counting the starts ≤ an index finds its magnitude.
    v = _counts(n, k)
    starts = np.zeros((n + 1, k + 1, k + 1), np.uint32)
    for m in range(1, n + 1):
        for j in range(k + 1):
            offset = v[m - 1][j]
            for t in range(1, k + 1):
                if t > j:
                    starts[m, j, t] = v[m][j]
                    continue
                starts[m, j, t] = offset
                offset += 2 * v[m - 1][j - t]
    return np.array(v, np.uint32), starts


def _check_index_fits(n: int, k: int, fn: str) -> None:
    v = pvq_count(n, k)
    if v >= 2**32:
        raise ValueError(
            f"{fn} k: V({n}, {k}) = {v} codewords do not fit a uint32 index "
            f"(log2 V = {math.log2(v):.2f} > 32); use fewer pulses or a smaller n."
        )


@functools.partial(jax.jit, static_argnums=1)
def _encode(y: jax.Array, k: int) -> jax.Array:
    # One scan step per coordinate, m = n, n − 1, ..., 1 coordinates left; the tables are
    # constants of the compiled program.
    n = y.shape[-1]
    counts, starts = (jnp.asarray(t) for t in _enumeration_tables(n, k))
    y = jnp.moveaxis(y.astype(jnp.int32), -1, 0)  # [n, ...]

    def step(carry, inputs):
        index, left = carry
        m, t = inputs
        size = jnp.abs(t)
        index = index + starts[m, left, size]
        index = index + jnp.where(t < 0, counts[m - 1, left - size], jnp.uint32(0))
        return (index, left - size), None

    init = (jnp.zeros(y.shape[1:], jnp.uint32), jnp.full(y.shape[1:], k, jnp.int32))
    (index, _), _ = jax.lax.scan(step, init, (jnp.arange(n, 0, -1), y))
    return index


@functools.partial(jax.jit, static_argnums=(1, 2))
def _decode(index: jax.Array, n: int, k: int) -> jax.Array:
    # The magnitude of each coordinate is the number of block starts ≤ the rest of the index
    # (starts past the last valid magnitude are V(m, j), above any valid rest).
    counts, starts = (jnp.asarray(t) for t in _enumeration_tables(n, k))

    def step(carry, m):
        rest, left = carry
        row = starts[m, left]  # [..., k + 1]
        size = jnp.sum(row[..., 1:] <= rest[..., None], axis=-1, dtype=jnp.int32)
        rest = rest - starts[m, left, size]
        block = counts[m - 1, left - size]
        negative = (size > 0) & (rest >= block)
        rest = rest - jnp.where(negative, block, jnp.uint32(0))
        return (rest, left - size), jnp.where(negative, -size, size)

    init = (index.astype(jnp.uint32), jnp.full(index.shape, k, jnp.int32))
    _, y = jax.lax.scan(step, init, jnp.arange(n, 0, -1))
    return jnp.moveaxis(y, 0, -1)


def pvq_encode(y: jax.Array, k: int) -> jax.Array:
    """The index of each pyramid point ``y`` [..., n] (L1 norm K) in the enumeration.

    Coordinate by coordinate, with m coordinates and j pulses left and the next coordinate t:

      index += start(m, j, |t|) + [t < 0] · V(m − 1, j − |t|),   j ← j − |t|,

    where ``start(m, j, s) = V(m−1, j) + 2 Σ_{1≤r<s} V(m−1, j−r)`` (s ≥ 1; 0 for s = 0) is the
    first index of the points of P(m, j) that start with +s (see the module docstring).

    Args:
      y: integer [..., n], every row with L1 norm exactly K (not checked: other rows give
        meaningless indices).
      k: number of pulses K ≥ 1, with V(n, K) < 2**32.

    Returns:
      uint32 [...] in [0, V(n, K)).

    Example:
      >>> pvq_encode(jnp.array([[0, 0, 2], [0, 0, -2], [-1, 0, 1]]), 2)
      Array([ 0,  1, 12], dtype=uint32)

    References:
      T. R. Fischer, "A pyramid vector quantizer", IEEE Trans. Inf. Theory 32(4), 1986
      (enumeration of the pyramid's points).
    """
    y = jnp.asarray(y)
    if y.ndim < 1 or y.shape[-1] < 1:
        raise ValueError(f"pvq_encode y: expected shape [..., n] with n >= 1, got {y.shape}.")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"pvq_encode y: expected an integer array, got {y.dtype}.")
    n = y.shape[-1]
    k = _int_arg(k, "k", "pvq_encode", 1)
    _check_index_fits(n, k, "pvq_encode")
    return _encode(y, k)


def pvq_decode(index: jax.Array, n: int, k: int) -> jax.Array:
    """The pyramid point of P(n, K) at each ``index`` of the enumeration; inverts pvq_encode.

    Coordinate by coordinate, with m coordinates and j pulses left: the magnitude is the
    largest s with ``start(m, j, s) ≤ index`` (the block the index falls in), the sign is
    negative if the index lies in the second half of that block, and the offset of the block
    is subtracted before the next coordinate.

    Args:
      index: integer [...], values in [0, V(n, K)) (not checked: other values decode to
        meaningless points).
      n: dimension, ≥ 1.
      k: number of pulses K ≥ 1, with V(n, K) < 2**32.

    Returns:
      int32 [..., n] with L1 norm K in every row.

    Example:
      >>> pvq_decode(jnp.array([0, 1, 12], jnp.uint32), 3, 2)
      Array([[ 0,  0,  2],
             [ 0,  0, -2],
             [-1,  0,  1]], dtype=int32)

    References:
      T. R. Fischer, "A pyramid vector quantizer", IEEE Trans. Inf. Theory 32(4), 1986.
    """
    index = jnp.asarray(index)
    if not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"pvq_decode index: expected an integer array, got {index.dtype}.")
    n = _int_arg(n, "n", "pvq_decode", 1)
    k = _int_arg(k, "k", "pvq_decode", 1)
    _check_index_fits(n, k, "pvq_decode")
    return _decode(index, n, k)


def _greedy_fill(a: jax.Array, w: jax.Array, k: int) -> jax.Array:
    # Fischer's projection, then the standard greedy PVQ search (Opus/CELT): scale |x| to ℓ1
    # norm K (a hair less, so that float rounding never overshoots), round down, and add the
    # at most n missing pulses one at a time, each where it raises the ratio the most.
    n = a.shape[-1]
    l1 = jnp.sum(a, axis=-1, keepdims=True)
    y = jnp.floor(a * (k * (1 - 1e-6) / jnp.where(l1 > 0, l1, 1))).astype(jnp.int32)
    # A zero row: any point is as good; all pulses on the first coordinate.
    y = jnp.where(l1 > 0, y, k * jax.nn.one_hot(0, n, dtype=jnp.int32))
    wa = w * a

    def add_pulse(_, y):
        xy = jnp.sum(wa * y, axis=-1, keepdims=True)
        yy = jnp.sum(w * y * y, axis=-1, keepdims=True)
        j = jnp.argmax(jnp.square(xy + wa) / (yy + w * (2 * y + 1)), axis=-1)
        short = (jnp.sum(y, axis=-1) < k).astype(jnp.int32)
        return y + jax.nn.one_hot(j, n, dtype=jnp.int32) * short[..., None]

    return jax.lax.fori_loop(0, min(k, n), add_pulse, y)


def _greedy_at(a: jax.Array, w: jax.Array, k: int, beta: jax.Array) -> jax.Array:
    # The maximizer of f_β(y) = <w·a, y> − β·<w, y²> over y ≥ 0, Σy = K: f_β is separable
    # and concave, so it takes the K largest marginal gains w_i (a_i − β(2t + 1)), t ≥ 0.
    n = a.shape[-1]
    t = jnp.arange(k, dtype=jnp.float32)
    gains = w[..., None] * (a[..., None] - beta[..., None, None] * (2 * t + 1))  # [..., n, K]
    _, top = jax.lax.top_k(gains.reshape(*gains.shape[:-2], n * k), k)
    return jnp.sum(jax.nn.one_hot(top // k, n, dtype=jnp.int32), axis=-2)


def _pyramid_search(a: jax.Array, w: jax.Array | None, k: int) -> jax.Array:
    """argmax over y ≥ 0, ||y||_1 = K of ``<w·a, y>² / <w, y²>`` (a ≥ 0, w > 0), [..., n]."""
    n = a.shape[-1]
    if w is None:
        # Unit weights as a scalar: an all-ones array would be constant-folded by XLA.
        w, w_max, inv_sum = jnp.float32(1), 1.0, float(n)
    else:
        w_max, inv_sum = jnp.max(w, axis=-1), jnp.sum(1 / w, axis=-1)
    wa = w * a

    def ratio(y):
        y = y.astype(jnp.float32)
        return jnp.square(jnp.sum(wa * y, axis=-1)) / jnp.sum(w * y * y, axis=-1)

    # The optimum y* maximizes f_β at β* = c*/(2 t*), c* = <w·a, y*>/t*, t* = ||y*||_w (see
    # pvq_nearest). Bracket β*: c* lies between the greedy point's ratio and ||a||_w; t*
    # between K/sqrt(Σ 1/w) (the real minimum of ||y||_w) and K·sqrt(max w).
    y_greedy = _greedy_fill(a, w, k)
    beta_lo = jnp.sqrt(ratio(y_greedy)) / (2 * k * jnp.sqrt(w_max))
    beta_hi = jnp.sqrt(jnp.sum(wa * a, axis=-1) * inv_sum) / (2 * k)
    beta_lo, beta_hi = beta_lo * (1 - 1e-5), beta_hi * (1 + 1e-5)
    y = _greedy_at(a, w, k, beta_lo)
    better = ratio(y) > ratio(y_greedy)
    best = jnp.where(better[..., None], y, y_greedy)

    def next_move(y):
        # Raising β, the greedy solution next moves one pulse from i (its last pulse's gain
        # falls fastest) to j, at β_ij = (w_i a_i − w_j a_j) / (w_i(2y_i − 1) − w_j(2y_j + 1)).
        yf = y.astype(jnp.float32)
        num = wa[..., :, None] - wa[..., None, :]
        den = (w * (2 * yf - 1))[..., :, None] - (w * (2 * yf + 1))[..., None, :]
        valid = (y[..., :, None] >= 1) & (den > 0)
        beta = jnp.where(valid, num / jnp.where(valid, den, 1), jnp.inf)
        flat = jnp.argmin(beta.reshape(*y.shape[:-1], n * n), axis=-1)
        beta = jnp.take_along_axis(beta.reshape(*y.shape[:-1], n * n), flat[..., None], -1)
        move = jax.nn.one_hot(flat % n, n, dtype=jnp.int32) - jax.nn.one_hot(
            flat // n, n, dtype=jnp.int32
        )
        return beta[..., 0], move

    def cond(state):
        _, _, done, step = state
        return ~jnp.all(done) & (step < k * (k + n))

    def body(state):
        y, best, done, step = state
        beta, move = next_move(y)
        done = done | (beta > beta_hi)
        y = y + move * (~done)[..., None].astype(jnp.int32)
        better = ratio(y) > ratio(best)
        return y, jnp.where(better[..., None], y, best), done, step + 1

    # Every move lowers <w, y²>, so the walk visits each point once; it ends when the next
    # move lies past β_hi (a few to a few tens of moves; the step bound is a safety net).
    # A zero row (β_hi = 0) is done: every point is as good.
    init = (y, best, beta_hi <= 0, jnp.array(0))
    _, best, _, _ = jax.lax.while_loop(cond, body, init)
    return best


@functools.partial(jax.jit, static_argnums=1)
def _nearest(x: jax.Array, k: int, w: jax.Array | None) -> jax.Array:
    # The signs of x (a coordinate against them only lowers the ratio), the search on |x|.
    y = _pyramid_search(jnp.abs(x).astype(jnp.float32), w, k)
    return jnp.where(x < 0, -y, y)


def pvq_nearest(x: jax.Array, k: int) -> jax.Array:
    """The point of P(n, K) nearest in angle to each row of ``x`` [..., n].

    Maximizes the cosine ``<x, y> / ||y||_2`` over the pyramid, exactly. The signs are those
    of x (a coordinate against x's sign only lowers the cosine), so with a = |x| the search
    maximizes ``c(y) = <a, y> / ||y||`` over y ≥ 0 with ||y||_1 = K:

    1. Fischer's projection ``⌊K·a / ||a||_1⌋`` completed by the standard greedy PVQ search
       (add the missing pulses one at a time, each where it raises c the most: Opus/CELT)
       gives a lower bound on the best ratio c*;
    2. for β > 0, ``f_β(y) = <a, y> − β||y||²`` is separable and concave, so its maximizer
       on the pyramid is the greedy choice of the K largest gains ``a_i − β(2t + 1)``, and
       the optimum y* maximizes f_β at ``β* = c* / (2||y*||)``: for all y,
       ``<a, y> ≤ c*||y|| ≤ β*||y||² + c*²/(4β*)``, with equality at y*;
    3. as β grows the greedy maximizer of f_β changes one pulse move at a time, so walking β
       over a bracket of β* (from the bound of step 1) and keeping the best c met finds y*.

    Each step of the walk compares the n² possible moves ([..., n, n] floats); the walk takes
    about K steps for Gaussian rows. Chunk very large batches (e.g. ``jax.lax.map``).

    The greedy search of step 1 alone (even refined by all single-pulse moves) misses the
    optimum on a few in a thousand Gaussian inputs at n = 8; this search matches brute force
    on every input of the tests, up to float32 rounding of near-ties.

    Args:
      x: float [..., n].
      k: number of pulses K ≥ 1.

    Returns:
      int32 [..., n], every row with L1 norm K and the signs of x (zeros of x get +).

    Example:
      >>> pvq_nearest(jnp.array([0.9, -0.5, 0.1, 0.0]), 4)
      Array([ 3, -1,  0,  0], dtype=int32)

    References:
      T. R. Fischer, "A pyramid vector quantizer", IEEE Trans. Inf. Theory 32(4), 1986.
      J.-M. Valin et al., "Definition of the Opus Audio Codec", RFC 6716, 2012 (CELT's PVQ).
      W. Dinkelbach, "On nonlinear fractional programming", Management Science 13(7), 1967
      (the parametric view of a ratio objective).
    """
    x = _float_vectors(x, "pvq_nearest")
    k = _int_arg(k, "k", "pvq_nearest", 1)
    return _nearest(x, k, None)


def pvq_nearest_weighted(x: jax.Array, k: int, weights: jax.Array) -> jax.Array:
    """The point of P(n, K) whose best multiple is nearest to ``x`` in the weighted norm.

    With ``W = diag(weights)`` (e.g. the Hessian diagonal of a layer's loss: the importance
    of each weight) the error of the best gain ``g = <Wx, y>/<Wy, y>`` for a shape y is

      min_g Σ_i w_i (x_i − g·y_i)² = Σ_i w_i x_i² − <W x, y>² / <W y, y>,

    so the search maximizes ``<W|x|, y>² / <W y, y>`` over y ≥ 0 in P(n, K), then takes the
    signs of x. It is :func:`pvq_nearest`'s exact search with every quantity weighted
    (``f_β(y) = <W|x|, y> − β<Wy, y>``, gains ``w_i(|x_i| − β(2t + 1))``), so its weighted
    error is never above that of the unweighted point (up to float32 rounding). With equal
    weights it is :func:`pvq_nearest`.

    Args:
      x: float [..., n].
      k: number of pulses K ≥ 1.
      weights: float [..., n] (broadcast to x's shape), all > 0.

    Returns:
      int32 [..., n], every row with L1 norm K and the signs of x.

    Example:
      >>> x = jnp.array([1.0, 0.9, 0.0, 0.0])
      >>> pvq_nearest_weighted(x, 1, jnp.array([1.0, 4.0, 1.0, 1.0]))
      Array([0, 1, 0, 0], dtype=int32)

    References:
      T. F. A. van der Ouderaa et al., "Pyramid Vector Quantization for LLMs",
      arXiv:2410.16926 (Hessian-informed PVQ search).
    """
    x = _float_vectors(x, "pvq_nearest_weighted")
    k = _int_arg(k, "k", "pvq_nearest_weighted", 1)
    weights = _float_vectors(weights, "pvq_nearest_weighted", "weights")
    try:
        shape = jnp.broadcast_shapes(x.shape, weights.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"pvq_nearest_weighted weights: shape {weights.shape} does not broadcast to x's "
            f"shape {x.shape}."
        )
    if not isinstance(weights, jax.core.Tracer) and not bool(jnp.all(weights > 0)):
        raise ValueError("pvq_nearest_weighted weights: expected all weights > 0.")
    return _nearest(x, k, jnp.broadcast_to(weights, x.shape).astype(jnp.float32))


@functools.cache
def _design_gains(n: int, k: int) -> np.ndarray:
    # The best gains <x, u> of N(0, I_n) vectors for their PVQ shapes, sorted, float64.
    x = np.random.default_rng(_GAIN_DESIGN_SEED).standard_normal((_GAIN_DESIGN_SAMPLES, n))
    x = x.astype(np.float32)
    # Concrete even when the caller is being traced (pvq_quantize under jit).
    with jax.ensure_compile_time_eval():
        y = np.asarray(jax.jit(pvq_nearest, static_argnums=1)(x, k), np.float64)
    g = np.sum(x * y, axis=-1) / np.linalg.norm(y, axis=-1)
    return np.sort(g)


def _lloyd_max(samples: np.ndarray, levels: np.ndarray, iterations: int = 300) -> np.ndarray:
    # 1-D k-means on sorted samples: cells between midpoints, levels at the cell means.
    total = np.concatenate([[0.0], np.cumsum(samples)])
    for _ in range(iterations):
        edges = np.searchsorted(samples, (levels[1:] + levels[:-1]) / 2)
        lo = np.concatenate([[0], edges])
        hi = np.concatenate([edges, [samples.size]])
        count = hi - lo
        means = (total[hi] - total[lo]) / np.maximum(count, 1)
        new = np.where(count > 0, means, levels)
        if np.max(np.abs(new - levels)) < 1e-12:
            break
        levels = new
    return np.sort(levels)


def gain_codebook(n: int, k: int, bits: int, *, method: str = "lloyd_max") -> np.ndarray:
    """The 2**bits gain levels for unit-variance i.i.d. Gaussian vectors and their PVQ shapes.

    For x ~ N(0, I_n) the norm ||x|| follows the chi distribution with n degrees of freedom,
    independent of the direction; the gain actually coded is the best one for the chosen
    shape u, ``g = <x, u> = ||x||·cos∠(x, u)``, slightly below ||x||. Since

      ||x − ĝ·u||² = ||x − g·u||² + (g − ĝ)²,

    the gain's share of the squared error is exactly ``(g − ĝ)²``, so the MSE-optimal levels
    are the Lloyd–Max quantizer of the distribution of g. That distribution has no simple
    closed form (the cosine depends on n and K), so it is sampled: 2**16 vectors from a fixed
    seed, searched with :func:`pvq_nearest`, then Lloyd–Max (1-D k-means from the quantile
    initialization) on their gains.

    ``method="quantile"`` instead puts the levels at the quantiles (i + ½)/2**bits of the
    same distribution: cells of equal probability, i.e. uniform quantization after the CDF,
    in the manner of the paper's amplitude quantizer (quantiles of the Beta distribution that
    the squared norm of a group of a row on the sphere follows). Every code is then used
    about equally often, but the MSE is above Lloyd–Max's at the same bits.

    Args:
      n: dimension, ≥ 1.
      k: number of pulses K ≥ 1.
      bits: gain bits, 0 ≤ bits ≤ 8 (0: one level, the mean gain).
      method: "lloyd_max" (default) or "quantile".

    Returns:
      float32 [2**bits], increasing.

    Example:
      >>> gain_codebook(8, 4, 2)   # ≈ [1.66, 2.29, 2.88, 3.61], below E||x|| ≈ 2.74 at the top

    References:
      S. P. Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 28(2), 1982;
      J. Max, "Quantizing for minimum distortion", IRE Trans. Inf. Theory 6(1), 1960.
      T. F. A. van der Ouderaa et al., arXiv:2410.16926 (Beta-CDF amplitude quantization).
    """
    n = _int_arg(n, "n", "gain_codebook", 1)
    k = _int_arg(k, "k", "gain_codebook", 1)
    bits = _int_arg(bits, "bits", "gain_codebook", 0)
    if bits > 8:
        raise ValueError(f"gain_codebook bits: expected bits <= 8 (uint8 codes), got {bits}.")
    if method not in _GAIN_METHODS:
        raise ValueError(f"gain_codebook method: expected one of {_GAIN_METHODS}, got {method!r}.")
    return _gain_levels(n, k, bits, method).copy()


@functools.cache
def _gain_levels(n: int, k: int, bits: int, method: str) -> np.ndarray:
    g = _design_gains(n, k)
    quantiles = np.quantile(g, (np.arange(2**bits) + 0.5) / 2**bits)
    if method == "lloyd_max":
        quantiles = _lloyd_max(g, quantiles)
    return quantiles.astype(np.float32)


def quantize_gain(norms: jax.Array, levels: jax.Array) -> jax.Array:
    """The code of the level nearest to each gain: ``argmin_c |norms − levels[c]|``.

    Args:
      norms: float [...], the gains to code.
      levels: float [L], increasing, 1 ≤ L ≤ 256 (e.g. :func:`gain_codebook`).

    Returns:
      uint8 [...] in [0, L).

    Example:
      >>> quantize_gain(jnp.array([0.1, 1.4, 9.0]), jnp.array([1.0, 2.0, 3.0]))
      Array([0, 0, 2], dtype=uint8)
    """
    norms = jnp.asarray(norms)
    if not jnp.issubdtype(norms.dtype, jnp.floating):
        raise ValueError(f"quantize_gain norms: expected a float array, got {norms.dtype}.")
    levels = jnp.asarray(levels)
    if levels.ndim != 1 or not 1 <= levels.shape[0] <= 256:
        raise ValueError(
            f"quantize_gain levels: expected shape [L], 1 <= L <= 256, got {levels.shape}."
        )
    if not jnp.issubdtype(levels.dtype, jnp.floating):
        raise ValueError(f"quantize_gain levels: expected a float array, got {levels.dtype}.")
    if not isinstance(levels, jax.core.Tracer) and not bool(jnp.all(jnp.diff(levels) > 0)):
        raise ValueError("quantize_gain levels: expected strictly increasing levels.")
    midpoints = (levels[1:] + levels[:-1]) / 2
    return jnp.searchsorted(midpoints, norms.astype(levels.dtype)).astype(jnp.uint8)


def pvq_quantize(x: jax.Array, k: int, gain_bits: int) -> tuple[jax.Array, jax.Array]:
    """Shape-gain PVQ of unit-variance vectors: ``x ≈ levels[gain_code] · y / ||y||_2``.

    The shape is ``y = pvq_nearest(x, K)``; the gain is the best one for that shape,
    ``g = <x, u>`` with ``u = y / ||y||_2`` (the projection of x on u, not ||x||), coded as the
    nearest level of ``gain_codebook(n, K, gain_bits)``. The caller divides x by its scale
    (e.g. per channel) first, so that it is roughly N(0, 1) per coordinate.

    Args:
      x: float [..., n].
      k: number of pulses K ≥ 1, with V(n, K) < 2**32.
      gain_bits: 0 ≤ gain_bits ≤ 8.

    Returns:
      ``(index, gain_code)``: uint32 [...] (see :func:`pvq_encode`) and uint8 [...].

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (1024, 8))
      >>> index, gain_code = pvq_quantize(x, 4, 4)
      >>> x_hat = pvq_dequantize(index, gain_code, 8, 4, 4)   # [1024, 8] float32

    References:
      T. F. A. van der Ouderaa et al., "Pyramid Vector Quantization for LLMs",
      arXiv:2410.16926. T. R. Fischer, IEEE Trans. Inf. Theory 32(4), 1986.
    """
    x = _float_vectors(x, "pvq_quantize")
    n = x.shape[-1]
    k = _int_arg(k, "k", "pvq_quantize", 1)
    gain_bits = _int_arg(gain_bits, "gain_bits", "pvq_quantize", 0)
    _check_index_fits(n, k, "pvq_quantize")
    levels = jnp.asarray(gain_codebook(n, k, gain_bits))
    y = pvq_nearest(x, k)
    yf = y.astype(jnp.float32)
    gain = jnp.sum(x.astype(jnp.float32) * yf, axis=-1) / jnp.linalg.norm(yf, axis=-1)
    return pvq_encode(y, k), quantize_gain(gain, levels)


def pvq_dequantize(
    index: jax.Array, gain_code: jax.Array, n: int, k: int, gain_bits: int
) -> jax.Array:
    """Inverts :func:`pvq_quantize`: ``levels[gain_code] · y / ||y||_2`` with y decoded.

    Args:
      index: uint32 [...] from :func:`pvq_quantize`.
      gain_code: uint8 [...] (same shape).
      n: dimension, ≥ 1.
      k: number of pulses K ≥ 1.
      gain_bits: 0 ≤ gain_bits ≤ 8.

    Returns:
      float32 [..., n].

    Example:
      >>> pvq_dequantize(jnp.array([0], jnp.uint32), jnp.array([0], jnp.uint8), 8, 4, 0)
      # ≈ [[0, 0, 0, 0, 0, 0, 0, 2.51]]: index 0 is (0, ..., 0, K), one gain level (the mean)
    """
    n = _int_arg(n, "n", "pvq_dequantize", 1)
    k = _int_arg(k, "k", "pvq_dequantize", 1)
    gain_bits = _int_arg(gain_bits, "gain_bits", "pvq_dequantize", 0)
    gain_code = jnp.asarray(gain_code)
    if not jnp.issubdtype(gain_code.dtype, jnp.integer):
        raise ValueError(
            f"pvq_dequantize gain_code: expected an integer array, got {gain_code.dtype}."
        )
    if gain_code.shape != jnp.shape(index):
        raise ValueError(
            f"pvq_dequantize gain_code: shape {gain_code.shape} differs from index's "
            f"{jnp.shape(index)}."
        )
    levels = jnp.asarray(gain_codebook(n, k, gain_bits))
    y = pvq_decode(index, n, k).astype(jnp.float32)
    return (
        levels[gain_code.astype(jnp.int32)][..., None]
        * y
        / jnp.linalg.norm(y, axis=-1, keepdims=True)
    )


def bits_per_weight(n: int, k: int, gain_bits: int) -> float:
    """The rate of shape-gain PVQ with an ideal index coder: (log2 V(n, K) + gain_bits) / n.

    Not rounded up: this is what an entropy/arithmetic coder of uniform indices approaches, or
    what packing several indices into one integer (mixed radix) gives. A fixed-length index
    costs :func:`fixed_length_bits_per_weight`.

    Args:
      n: dimension, ≥ 1.
      k: number of pulses K ≥ 1.
      gain_bits: ≥ 0.

    Returns:
      Bits per weight (float).

    Example:
      >>> round(bits_per_weight(8, 4, 4), 4)   # log2 2816 = 11.459
      1.9324
    """
    n = _int_arg(n, "n", "bits_per_weight", 1)
    k = _int_arg(k, "k", "bits_per_weight", 1)
    gain_bits = _int_arg(gain_bits, "gain_bits", "bits_per_weight", 0)
    return (math.log2(pvq_count(n, k)) + gain_bits) / n


def fixed_length_bits_per_weight(n: int, k: int, gain_bits: int) -> float:
    """The rate with a fixed-length index: (⌈log2 V(n, K)⌉ + gain_bits) / n.

    Args:
      n: dimension, ≥ 1.
      k: number of pulses K ≥ 1.
      gain_bits: ≥ 0.

    Returns:
      Bits per weight (float).

    Example:
      >>> fixed_length_bits_per_weight(8, 4, 4)   # ⌈log2 2816⌉ = 12
      2.0
    """
    n = _int_arg(n, "n", "fixed_length_bits_per_weight", 1)
    k = _int_arg(k, "k", "fixed_length_bits_per_weight", 1)
    gain_bits = _int_arg(gain_bits, "gain_bits", "fixed_length_bits_per_weight", 0)
    return ((pvq_count(n, k) - 1).bit_length() + gain_bits) / n
