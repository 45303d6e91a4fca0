"""E8P, QuIP#'s 2-bit E8 lattice codebook, and its residual extensions to 3 and 4 bits.

Terminology:
  source vector: one of 256 vectors ``a`` of positive half-odd-integer coordinates (1/2, 3/2,
      5/2); a codeword is ``σ ⊙ a ± ¼·1`` for a sign pattern ``σ``.
  sign parity: ``σ`` must negate a number of coordinates ≡ Σa (mod 2), which makes ``σ ⊙ a``
      a half-integer point of E8 (coordinate sum even); 7 signs are stored, the 8th follows.
  shift: ±¼ in every coordinate. ``σ ⊙ a + ¼`` and ``σ ⊙ a − ¼ = (σ ⊙ a − ½) + ¼`` both lie in
      E8 + ¼·1 (the first from E8's half-integer coset, the second from D8), so E8P is a set of
      2^16 points of the shifted lattice E8 + ¼·1, clustered in a ball around the origin.
  index: 16 bits per 8 weights (2 bits/weight):
      ``idx = source << 8 | shift_bit << 7 | sign_bits``, ``shift_bit = 1`` for −¼,
      ``sign_bits`` bit i = 1 when coordinate i (0..6) is negative; coordinate 7 is negative
      when ``popcount(sign_bits) + Σa`` is odd.
  residual stage: RVQ (QuIP#'s 3- and 4-bit codebooks): stage k quantizes the residual left by
      stages < k, scaled up by a per-stage constant ``rₖ``; its codebook is folded as
      ``base_codebook / rₖ``, so a reconstruction is the plain sum of the stages' rows.

Construction of the 256 source vectors (QuIP#, Sec. 4.2 / App.): all 227 vectors of
{1/2, 3/2, 5/2}^8 with ‖a‖² ≤ 10 (the absolute values of the points of D8 + ½ in the ball of
radius √10), plus 29 of the 56 norm-12 vectors with five coordinates 3/2 and three 1/2 (the
positions of the three 1/2's are listed in ``_NORM12_HALVES``, see there for how they were
picked). Source indices: the 227 by norm, then lexicographically; then the 29 in that list's
order.

Nearest-point search (``e8p_encode``) is exact and restricted: for each shift t, y = x − t,
  ‖y − σ⊙a‖² = ‖y‖² + ‖a‖² − 2 Σᵢ σᵢ aᵢ yᵢ,
which for a fixed source a is minimized by σ = sign(y) when that pattern has the required
parity, and otherwise by also flipping the one coordinate with the smallest aᵢ|yᵢ| (every flip
costs 2 aᵢ|yᵢ| ≥ 0, and a wrong parity needs an odd number of them). So each source scores
  a·|y| − ‖a‖²/2 − [parity wrong] · 2 minᵢ aᵢ|yᵢ|
from 8 broadcast products aᵢ|yᵢ| of shape [n, 256] (their sum and their min), the best of the
2 × 256 scores wins, and the 65536 codewords are never enumerated (``e8p_codebook`` is only the
reference table).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

_DIM = 8
_NUM_CODEWORDS = 1 << 16
_NUM_SOURCES = 256
# Rows encoded at a time: bounds the [rows, 256] score matrices to a few MiB.
_CHUNK = 8192

# Positions of the three 1/2-coordinates in the 29 norm-12 sources (the other five are 3/2):
# the 28 triples with an odd sum of positions, then {0, 1, 3}. All 56 such sources are equal up
# to a permutation of coordinates; which 29 are kept changes the N(0,1) MSE only through how
# they crowd one another: this spread-out choice measured 0.09145 (2^18 vectors), the same as a
# greedy search with swaps, against 0.09154 for the 29 lexicographically first triples.
_NORM12_HALVES = (
    *(t for t in itertools.combinations(range(_DIM), 3) if sum(t) % 2 == 1),
    (0, 1, 3),
)


@functools.cache
def _sources() -> np.ndarray:
    """float64 [256, 8]: the source vectors (see the module docstring)."""
    inner = np.array(list(itertools.product((0.5, 1.5, 2.5), repeat=_DIM)))
    inner = inner[np.sum(inner**2, axis=1) <= 10]
    # Sort by norm, then lexicographically (np.lexsort's last key is the primary one).
    inner = inner[np.lexsort((*inner.T[::-1], np.sum(inner**2, axis=1)))]
    outer = np.full((len(_NORM12_HALVES), _DIM), 1.5)
    for row, halves in zip(outer, _NORM12_HALVES, strict=True):
        row[list(halves)] = 0.5
    src = np.concatenate([inner, outer])
    assert src.shape == (_NUM_SOURCES, _DIM) and len(np.unique(src, axis=0)) == _NUM_SOURCES
    return src


@functools.cache
def _source_parity() -> np.ndarray:
    """int32 [256]: Σa mod 2, the parity the number of negated coordinates must have."""
    return (np.round(np.sum(_sources(), axis=1)).astype(np.int64) % 2).astype(np.int32)


def _check_points(x, name: str, fn: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != _DIM:
        raise ValueError(f"{fn} {name}: expected shape [..., 8], got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn} {name}: expected a float array, got {x.dtype}.")
    return x


def _check_indices(idx, name: str, fn: str) -> jax.Array:
    idx = jnp.asarray(idx)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"{fn} {name}: expected an integer array, got {idx.dtype}.")
    return idx


def e8p_codebook() -> np.ndarray:
    """The E8P codebook as a table: row i is the codeword of index i.

    Built in numpy, independently of ``e8p_decode`` (tests check that the two agree). Cached
    and read-only.

    Returns:
      float32 [65536, 8]; every row lies in E8 + ¼·1.

    References:
      Tseng et al., "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice
      Codebooks", arXiv:2402.04396, Sec. 4.2.
    """
    return _codebook_table()


@functools.cache
def _codebook_table() -> np.ndarray:
    idx = np.arange(_NUM_CODEWORDS)
    src, shift_bit, sign_bits = idx >> 8, (idx >> 7) & 1, idx & 127
    neg = (sign_bits[:, None] >> np.arange(_DIM - 1)) & 1  # [65536, 7]
    last = (np.sum(neg, axis=1) + _source_parity()[src]) % 2
    neg = np.concatenate([neg, last[:, None]], axis=1)  # [65536, 8]
    table = _sources()[src] * (1 - 2 * neg) + np.where(shift_bit, -0.25, 0.25)[:, None]
    table = table.astype(np.float32)
    table.flags.writeable = False
    return table


def _first_argmax(score: jax.Array) -> jax.Array:
    # Index of the first maximum along the last axis, as two plain reductions (jnp.argmax's
    # variadic reduction is several times slower on CPU).
    best = jnp.max(score, axis=-1, keepdims=True)
    ids = jnp.arange(score.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(score == best, ids, score.shape[-1]), axis=-1)


def _encode_rows(x: jax.Array) -> jax.Array:
    """uint16 [n] for f32 x [n, 8]: the exact search of the module docstring."""
    a = jnp.asarray(_sources(), jnp.float32)  # [256, 8]
    half_norm = 0.5 * jnp.sum(a * a, axis=1)  # [256]
    parity = jnp.asarray(_source_parity())  # [256]

    def best_for_shift(y):
        # Best codeword σ⊙a (before the shift) for y = x − shift, and its squared distance.
        ay = jnp.abs(y)
        neg = y < 0
        # a·|y| and min_i a_i|y_i| from the same 8 broadcast products [n, 256]: XLA fuses them
        # into one loop vectorized along the source axis (a matmul plus a min-reduction over
        # a short last axis of a [n, 256, 8] product both run several times slower on CPU).
        prods = [ay[:, i : i + 1] * a[:, i] for i in range(_DIM)]
        corr = functools.reduce(jnp.add, prods)
        cheapest = functools.reduce(jnp.minimum, prods)
        odd = jnp.sum(neg, axis=-1, dtype=jnp.int32) % 2  # [n]: sign(y) negates an odd number
        wrong = odd[:, None] != parity  # [n, 256]
        score = corr - half_norm - jnp.where(wrong, 2.0 * cheapest, 0.0)
        best = jnp.max(score, axis=-1)
        k = _first_argmax(score)
        # Flip the cheapest coordinate of the chosen source when its parity needs it.
        flip = jnp.argmin(ay * a[k], axis=-1)
        wrong_k = odd != parity[k]  # [n]
        neg = neg ^ (wrong_k[:, None] & (jnp.arange(_DIM) == flip[:, None]))
        dist = jnp.sum(y * y, axis=-1) - 2.0 * best
        return k, neg, dist

    k_plus, neg_plus, d_plus = best_for_shift(x - 0.25)
    k_minus, neg_minus, d_minus = best_for_shift(x + 0.25)
    minus = d_minus < d_plus
    k = jnp.where(minus, k_minus, k_plus)
    neg = jnp.where(minus[:, None], neg_minus, neg_plus)
    sign_bits = jnp.sum(neg[:, : _DIM - 1].astype(jnp.int32) << jnp.arange(_DIM - 1), axis=-1)
    idx = (k.astype(jnp.int32) << 8) | (minus.astype(jnp.int32) << 7) | sign_bits
    return idx.astype(jnp.uint16)


def _map_rows(fn, x: jax.Array) -> jax.Array:
    """fn over the rows of x [..., 8] (fn: f32 [n, 8] -> [n, ...]), in chunks of _CHUNK rows."""
    shape = x.shape[:-1]
    rows = x.reshape(-1, _DIM).astype(jnp.float32)
    n = rows.shape[0]
    if n <= _CHUNK:
        out = fn(rows)
    else:
        # Fixed-size chunks through lax.map keep memory at O(_CHUNK · 256) for any n.
        chunks = -(-n // _CHUNK)
        rows = jnp.pad(rows, ((0, chunks * _CHUNK - n), (0, 0)))
        out = jax.lax.map(fn, rows.reshape(chunks, _CHUNK, _DIM))
        out = out.reshape(chunks * _CHUNK, *out.shape[2:])[:n]
    return out.reshape(*shape, *out.shape[1:])


@jax.jit
def _encode(x: jax.Array) -> jax.Array:
    return _map_rows(_encode_rows, x)


def e8p_encode(x: jax.Array) -> jax.Array:
    """Index of the nearest E8P codeword to each row of ``x`` (exact, without a table search).

    ``argmin_i ‖x − e8p_codebook()[i]‖²``, computed from the structure (2 shifts × 256 source
    vectors, parity fixed by one sign flip; see the module docstring). Ties go to the +¼
    shift and to the lower source index.

    Args:
      x: float [..., 8], finite, already in the codebook's units (divide by a scale first,
        e.g. ``E8P_GAUSSIAN_SCALE · σ`` for data of standard deviation σ); searched in
        float32.

    Returns:
      uint16 [...]: 16-bit codeword indices.

    Example:
      >>> c = jnp.asarray(e8p_codebook()[1234])
      >>> int(e8p_encode(c + 0.01))
      1234

    References:
      Tseng et al., arXiv:2402.04396, Sec. 4.2 and App. (E8P).
    """
    x = _check_points(x, "x", "e8p_encode")
    return _encode(x)


@jax.jit
def _decode(idx: jax.Array) -> jax.Array:
    i = idx.astype(jnp.int32) & (_NUM_CODEWORDS - 1)
    src, shift_bit, sign_bits = i >> 8, (i >> 7) & 1, i & 127
    neg = (sign_bits[..., None] >> jnp.arange(_DIM - 1)) & 1  # [..., 7]
    last = (jnp.sum(neg, axis=-1) + jnp.asarray(_source_parity())[src]) & 1
    neg = jnp.concatenate([neg, last[..., None]], axis=-1)  # [..., 8]
    a = jnp.asarray(_sources(), jnp.float32)[src]  # [..., 8]
    shift = jnp.where(shift_bit == 1, -0.25, 0.25).astype(jnp.float32)
    return a * (1 - 2 * neg).astype(jnp.float32) + shift[..., None]


def e8p_decode(idx: jax.Array) -> jax.Array:
    """The E8P codeword of each 16-bit index, computed from the bit fields (no table).

    Args:
      idx: integer [...]; only the low 16 bits are read.

    Returns:
      float32 [..., 8], equal to ``e8p_codebook()[idx]``.

    Example:
      >>> e8p_decode(jnp.uint16(0))
      Array([0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75], dtype=float32)
    """
    idx = _check_indices(idx, "idx", "e8p_decode")
    return _decode(idx)


# -------------------------------------------------------------------------------------------
# Residual stages (3 and 4 bits per weight).

# Scales for x ~ N(0, 1), measured on 2^17–2^20 vectors of np.random.default_rng(1234) (not
# ``E8P.gaussian_mse``'s default seed) by grid search, coarse then in steps of 0.0025 (E8P) or
# 0.005–0.01 (s) × 0.03–0.05 (r₂): each setting is flat to < 0.1% of the MSE around its optimum.
#   2 bits: s = 0.965                MSE 0.09136
#   3 bits: s = 1.015, r₂ = 2.04     MSE 0.02953
#   4 bits: s = 1.12,  r₂ = 3.85     MSE 0.00833
E8P_GAUSSIAN_SCALE = 0.965
_STAGES = {2: ("e8p",), 3: ("e8p", "e81b"), 4: ("e8p", "e8p")}
# r_k: stage k quantizes the residual times r_k (r_1 = 1).
_RESIDUAL_SCALES = {2: (1.0,), 3: (1.0, 2.04), 4: (1.0, 3.85)}
_GAUSSIAN_SCALES = {2: E8P_GAUSSIAN_SCALE, 3: 1.015, 4: 1.12}


@functools.cache
def _e81b() -> np.ndarray:
    """float64 [256, 8]: the 1-bit-per-weight stage codebook (see ``residual_codebooks``)."""
    roots = [np.zeros(_DIM)]
    for i, j in itertools.combinations(range(_DIM), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = np.zeros(_DIM)
            v[i], v[j] = si, sj
            roots.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=_DIM):
        if sum(s < 0 for s in signs) % 2 == 0:
            roots.append(np.array(signs))
    for i in range(15):
        v = np.zeros(_DIM)
        v[i % _DIM] = 2.0 if i < _DIM else -2.0
        roots.append(v)
    out = np.stack(roots)
    assert out.shape == (256, _DIM) and len(np.unique(out, axis=0)) == 256
    return out


def _check_bits(bits, fn: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in _STAGES:
        raise ValueError(f"{fn} bits: expected one of (2, 3, 4), got {bits!r}.")
    return int(bits)


def _stage_factors(bits: int) -> tuple[np.float32, ...]:
    # 1 / r_k in float32: folding multiplies by it, in numpy and in JAX alike, so the tables
    # of residual_codebooks and residual_decode agree bit for bit.
    return tuple(np.float32(1.0 / r) for r in _RESIDUAL_SCALES[bits])


@functools.cache
def _residual_tables(bits: int) -> tuple[np.ndarray, ...]:
    tables = []
    for kind, factor in zip(_STAGES[bits], _stage_factors(bits), strict=True):
        base = _codebook_table() if kind == "e8p" else _e81b().astype(np.float32)
        table = base * factor
        table.flags.writeable = False
        tables.append(table)
    return tuple(tables)


def residual_codebooks(bits: int) -> list[np.ndarray]:
    """The per-stage codebooks of the residual (RVQ) quantizer at ``bits`` bits per weight.

    A vector is reconstructed as ``Σₖ codebooks[k][idx[..., k]]``; stage k's table is its base
    codebook divided by the stage's residual scale rₖ (r₁ = 1, tuned for N(0,1) data together
    with ``residual_gaussian_scale``):

      bits = 2: [E8P]                       16-bit index.
      bits = 3: [E8P, E8-1bit / r₂]          16 + 8 bits per 8 weights.
      bits = 4: [E8P, E8P / r₂]              16 + 16 bits per 8 weights.

    E8-1bit (QuIP#'s "E81B") holds 256 points of E8 nearest the origin: 0, the 240 roots
    (norm² 2: all (±1, ±1, 0⁶) and (±½)⁸ with an even number of minus signs), and 15 of the 16
    norm² 4 points ±2eᵢ (all but −2e₈, that of the last coordinate). Dropping 0 instead, for
    the fully sign-symmetric 240 roots and 16 points ±2eᵢ, measured the same MSE.

    Args:
      bits: 2, 3 or 4.

    Returns:
      list of float32 [2^bₖ, 8] arrays (read-only), one per stage.

    References:
      Tseng et al., arXiv:2402.04396, Sec. 4.3 (residual vector quantization).
    """
    return list(_residual_tables(_check_bits(bits, "residual_codebooks")))


def _nearest_row(x: jax.Array, table: np.ndarray) -> jax.Array:
    """int32 [n]: brute-force nearest row of a small table [m, 8] to each row of x [n, 8]."""
    t = jnp.asarray(table, jnp.float32)
    # x·t − ‖t‖²/2 from 8 broadcast products (see _encode_rows).
    dots = functools.reduce(jnp.add, [x[:, i : i + 1] * t[:, i] for i in range(_DIM)])
    return _first_argmax(dots - 0.5 * jnp.sum(t * t, axis=1))


def _residual_encode_rows(x: jax.Array, bits: int) -> jax.Array:
    """uint16 [n, stages] for f32 x [n, 8]: greedy RVQ, the nearest row of each stage's table
    to what the stages before it left."""
    r = x
    idxs = []
    for kind, scale, factor, table in zip(
        _STAGES[bits],
        _RESIDUAL_SCALES[bits],
        _stage_factors(bits),
        _residual_tables(bits),
        strict=True,
    ):
        if kind == "e8p":
            i = _encode_rows(r * np.float32(scale)).astype(jnp.int32)
            c = _decode(i) * factor
        else:
            i = _nearest_row(r, table)
            c = jnp.asarray(table)[i]
        idxs.append(i)
        r = r - c
    return jnp.stack(idxs, axis=-1).astype(jnp.uint16)


@functools.partial(jax.jit, static_argnames="bits")
def _residual_encode(x: jax.Array, bits: int) -> jax.Array:
    return _map_rows(functools.partial(_residual_encode_rows, bits=bits), x)


def residual_encode(x: jax.Array, bits: int) -> jax.Array:
    """Greedy residual (RVQ) encoding of each row of ``x`` at ``bits`` bits per weight.

    Stage k picks the row of ``residual_codebooks(bits)[k]`` nearest to
    ``x − Σ_{j<k} codebooks[j][idx_j]`` (E8P stages by the exact search of ``e8p_encode``
    applied to the residual times rₖ; the 256-row stage by brute force).

    Args:
      x: float [..., 8] in the codebook's units (divide by ``residual_gaussian_scale(bits) · σ``
        for data of standard deviation σ).
      bits: 2, 3 or 4.

    Returns:
      uint16 [..., stages]: one index per stage (1 stage at 2 bits, 2 at 3 and 4 bits; the
      3-bit second stage uses 8 of its 16 bits).

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (1024, 8)) / residual_gaussian_scale(4)
      >>> residual_encode(x, 4).shape
      (1024, 2)

    References:
      Tseng et al., arXiv:2402.04396, Sec. 4.3.
    """
    bits = _check_bits(bits, "residual_encode")
    x = _check_points(x, "x", "residual_encode")
    return _residual_encode(x, bits)


@functools.partial(jax.jit, static_argnames="bits")
def _residual_decode(idx: jax.Array, bits: int) -> jax.Array:
    i = idx.astype(jnp.int32)
    out = None
    for k, (kind, factor, table) in enumerate(
        zip(_STAGES[bits], _stage_factors(bits), _residual_tables(bits), strict=True)
    ):
        if kind == "e8p":
            c = _decode(i[..., k]) * factor
        else:
            c = jnp.asarray(table)[i[..., k] & (len(table) - 1)]
        out = c if out is None else out + c
    return out


def residual_decode(idx: jax.Array, bits: int) -> jax.Array:
    """Reconstruction ``Σₖ residual_codebooks(bits)[k][idx[..., k]]``.

    Args:
      idx: integer [..., stages], as returned by ``residual_encode`` (E8P stages read the low
        16 bits of their index, the 256-row stage the low 8).
      bits: 2, 3 or 4.

    Returns:
      float32 [..., 8].
    """
    bits = _check_bits(bits, "residual_decode")
    idx = _check_indices(idx, "idx", "residual_decode")
    stages = len(_STAGES[bits])
    if idx.ndim < 1 or idx.shape[-1] != stages:
        raise ValueError(
            f"residual_decode idx: expected shape [..., {stages}] at {bits} bits, got {idx.shape}."
        )
    return _residual_decode(idx, bits)


def residual_gaussian_scale(bits: int) -> float:
    """The scale s minimizing the MSE of ``s · residual_decode(residual_encode(x / s))`` for
    x ~ N(0, 1) (``E8P(bits).gaussian_mse``);
    ``residual_gaussian_scale(2) == E8P_GAUSSIAN_SCALE``."""
    return _GAUSSIAN_SCALES[_check_bits(bits, "residual_gaussian_scale")]
