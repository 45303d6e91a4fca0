"""k-means codebooks: k-means++ seeding and Lloyd iterations in jit, optionally weighted.

Terminology:
  x:          the vectors to cluster, f32 [M, d] (d = 1 to 8 in jaxquant's use).
  codebook:   f32 [C, d], one centroid (codeword) per row; C up to 2**16.
  weights:    importance of each element, f32 [M, d] (e.g. the Hessian diagonal of the input
              each element multiplies) or [M] (one per vector); the distortion is
              ``Σ_m Σ_i weights[m, i] · (x[m, i] − codebook[a(m), i])²``.
  assignment: int32 [M], the codeword of each vector (the one of least weighted distance).

Lloyd's iteration alternates the assignment with the centroid update
``codebook[j, i] = Σ_{a(m)=j} weights[m, i] x[m, i] / Σ_{a(m)=j} weights[m, i]``; neither step
can raise the distortion, so it decreases monotonically (an empty cluster keeps its centroid).
Distances use the matmul form ``Σ w x² − 2 (w x) cᵀ + w (c²)ᵀ`` in chunks of vectors, so memory
stays at ``chunk × C`` whatever M is.

Seeding is k-means++ (D² sampling: each new centroid drawn with probability proportional to
the weighted squared distance to the nearest one already chosen). For C > ``SEED_ROUNDS`` the
centroids are drawn ``ceil(C / SEED_ROUNDS)`` at a time per round (without replacement, by the
Gumbel top-k trick), as in k-means|| (Bahmani et al., arXiv:1203.6402): C sequential rounds over
all M vectors would cost C passes, this costs ``SEED_ROUNDS``.

References:
  Lloyd, "Least squares quantization in PCM", IEEE Trans. IT 28(2), 1982.
  Arthur & Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

SEED_ROUNDS = 256
MAX_CODEBOOK = 2**16
# Elements of one [chunk, C] distance block.
_BLOCK_ELEMENTS = 2**22


def _check(x, num_clusters, weights):
    x = jnp.asarray(x)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"kmeans x: expected a float [M, d] array, got {x.dtype} {x.shape}.")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int):
        raise ValueError(f"kmeans num_clusters={num_clusters!r}: expected an int.")
    if not 1 <= num_clusters <= MAX_CODEBOOK:
        raise ValueError(f"kmeans num_clusters={num_clusters}: expected 1 to {MAX_CODEBOOK}.")
    if x.shape[0] < num_clusters:
        raise ValueError(
            f"kmeans x: {x.shape[0]} vectors cannot seed num_clusters={num_clusters} centroids."
        )
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape not in (x.shape, x.shape[:1]):
            raise ValueError(
                f"kmeans weights: expected shape {x.shape} or {x.shape[:1]}, got {weights.shape}."
            )
    return x.astype(jnp.float32), weights


def _full_weights(x, weights):
    if weights is None:
        return jnp.ones_like(x)
    w = jnp.asarray(weights, jnp.float32)
    w = jnp.broadcast_to(w[:, None], x.shape) if w.ndim == 1 else w
    return jnp.maximum(w, 0.0)


def _chunk(m: int, c: int) -> int:
    return max(1, min(m, _BLOCK_ELEMENTS // max(c, 1)))


def _map_chunks(fn, arrays, m: int, chunk: int):
    """``fn`` over row chunks of ``arrays`` (padded to whole chunks), results concatenated."""
    pad = -m % chunk
    padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    stacked = [a.reshape((-1, chunk) + a.shape[1:]) for a in padded]
    out = jax.lax.map(lambda t: fn(*t), tuple(stacked))
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:])[:m], out)


def weighted_distances(x, w, codebook) -> jax.Array:
    """f32 [M, C]: ``Σ_i w[m, i] (x[m, i] − codebook[j, i])²`` (clamped at 0)."""
    wx = w * x
    d = (
        jnp.sum(wx * x, axis=1, keepdims=True)
        - 2.0 * jnp.dot(wx, codebook.T, precision=jax.lax.Precision.HIGHEST)
        + jnp.dot(w, (codebook * codebook).T, precision=jax.lax.Precision.HIGHEST)
    )
    return jnp.maximum(d, 0.0)


def _assign(x, w, codebook):
    """(assignment int32 [M], distance [M]) by chunks of rows."""
    m, c = x.shape[0], codebook.shape[0]

    def block(xb, wb):
        d = weighted_distances(xb, wb, codebook)
        return jnp.argmin(d, axis=1).astype(jnp.int32), jnp.min(d, axis=1)

    return _map_chunks(block, (x, w), m, _chunk(m, c))


def assign(x, codebook, weights=None) -> jax.Array:
    """int32 [M]: the nearest codeword of each row of ``x`` under ``weights`` (see module doc)."""
    x, weights = _check(x, 1, weights)
    codebook = jnp.asarray(codebook, jnp.float32)
    if codebook.ndim != 2 or codebook.shape[1] != x.shape[1]:
        raise ValueError(
            f"assign codebook: expected [C, {x.shape[1]}], got {tuple(codebook.shape)}."
        )
    return jax.jit(_assign)(x, _full_weights(x, weights), codebook)[0]


def distortion(x, codebook, weights=None) -> jax.Array:
    """f32 scalar: the mean weighted squared error per element of the nearest assignment."""
    x, weights = _check(x, 1, weights)
    codebook = jnp.asarray(codebook, jnp.float32)
    _, d = jax.jit(_assign)(x, _full_weights(x, weights), codebook)
    return jnp.sum(d) / x.size


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def _seed(key, x, w, *, num_clusters):
    """k-means++ (D² sampling): one uniform draw, then ``per_round`` centroids per round."""
    m, d = x.shape
    rest = num_clusters - 1
    per_round = max(1, math.ceil(rest / SEED_ROUNDS))
    rounds = math.ceil(rest / per_round)
    k0, key = jax.random.split(key)
    first = jax.random.randint(k0, (), 0, m)
    codebook = jnp.zeros((1 + rounds * per_round, d), jnp.float32).at[0].set(x[first])
    chosen = jnp.zeros((m,), bool).at[first].set(True)
    dist = weighted_distances(x, w, x[first][None])[:, 0]

    def round_fn(r, carry):
        codebook, dist, chosen, key = carry
        key, sub = jax.random.split(key)
        # Gumbel top-k: `per_round` draws without replacement, probability ∝ dist.
        logits = jnp.where(chosen | (dist <= 0), -jnp.inf, jnp.log(jnp.maximum(dist, 1e-30)))
        g = logits + jax.random.gumbel(sub, (m,))
        _, idx = jax.lax.top_k(g, per_round)
        # Fewer candidates than slots (duplicate points): repeat the first centroid.
        new = jnp.where(jnp.isfinite(g[idx])[:, None], x[idx], x[first])
        codebook = jax.lax.dynamic_update_slice_in_dim(codebook, new, 1 + r * per_round, 0)
        chosen = chosen.at[idx].set(True)
        dist = jnp.minimum(dist, jnp.min(weighted_distances(x, w, new), axis=1))
        return codebook, dist, chosen, key

    codebook = jax.lax.fori_loop(0, rounds, round_fn, (codebook, dist, chosen, key))[0]
    return codebook[:num_clusters]


@functools.partial(jax.jit, static_argnames=("iters",))
def _lloyd(x, w, codebook, tol, *, iters):
    """Up to ``iters`` Lloyd steps, stopping once one lowers the distortion by less than
    ``tol`` (relative)."""
    c = codebook.shape[0]

    def step(carry):
        i, codebook, _, prev = carry
        a, dist = _assign(x, w, codebook)
        total = jnp.sum(dist)  # the distortion of `codebook`, before this update
        num = jax.ops.segment_sum(w * x, a, num_segments=c)
        den = jax.ops.segment_sum(w, a, num_segments=c)
        # Empty clusters (or zero-weight coordinates) keep their centroid.
        new = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), codebook)
        return i + 1, new, prev, total

    def going(carry):
        i, _, older, prev = carry
        return (i < iters) & ((i < 2) | (older - prev > tol * prev))

    init = (0, codebook, jnp.float32(jnp.inf), jnp.float32(jnp.inf))
    return jax.lax.while_loop(going, step, init)[1]


def kmeans(
    x,
    num_clusters: int,
    *,
    weights=None,
    iters: int = 100,
    tol: float = 1e-5,
    key: jax.Array | None = None,
    max_seed_points: int | None = None,
) -> jax.Array:
    """A k-means codebook of ``num_clusters`` centroids for the rows of ``x``.

    k-means++ seeding (in rounds above ``SEED_ROUNDS`` centroids), then Lloyd iterations
    until they stop helping (``tol``) or ``iters`` of them ran, all jitted; with ``weights``
    both minimize the weighted distortion (see the module docstring).

    Args:
      x: float [M, d], M >= num_clusters.
      num_clusters: C, 1 to 2**16.
      weights: None, f32 [M, d] or [M]: non-negative importance of each element or vector.
      iters: the most Lloyd iterations (0 returns the seeding).
      tol: stop once an iteration lowers the distortion by less than this fraction.
      key: PRNG key of the seeding (default ``jax.random.key(0)``).
      max_seed_points: seed from a random subset of this many vectors (default: all; at
        least ``num_clusters``); Lloyd always runs on all of them.

    Returns:
      f32 [num_clusters, d].

    Example:
      >>> codebook = kmeans(w.reshape(-1, 4), 256)      # 8-bit indices of 4-vectors
      >>> idx = assign(w.reshape(-1, 4), codebook)
    """
    x, weights = _check(x, num_clusters, weights)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"kmeans iters={iters!r}: expected an int >= 0.")
    key = jax.random.key(0) if key is None else key
    w = _full_weights(x, weights)
    xs, ws = x, w
    if max_seed_points is not None and max_seed_points < x.shape[0]:
        n = max(max_seed_points, num_clusters)
        k_sub, key = jax.random.split(key)
        idx = jax.random.choice(k_sub, x.shape[0], (n,), replace=False)
        xs, ws = x[idx], w[idx]
    codebook = _seed(key, xs, ws, num_clusters=num_clusters)
    return _lloyd(x, w, codebook, jnp.float32(tol), iters=iters)
