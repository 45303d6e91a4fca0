"""Low-rank gradient projection onto columns of a fixed DCT basis, chosen by alignment.

Terminology:
  basis:           the orthonormal DCT-II matrix ``Q`` [n, n] of the projected dimension;
                   column ``k`` is the cosine of frequency ``k`` sampled at ``n`` points.
  projected side:  the dimension of a 2-D leaf that is reduced to ``rank``: its columns
                   (``axis=1``, ``G Q``) or its rows (``axis=0``, ``Qᵀ G``).
  alignment:       ``S = G Q`` (or ``Qᵀ G``), the gradient's DCT coefficients along that side;
                   the score of basis vector ``k`` is the ℓ1 norm of ``S``'s column (row) ``k``.
  indices:         the ``rank`` int32 column numbers of ``Q`` in use; ``Q`` itself is never
                   stored, its columns are recomputed from their numbers each step.
  slot:            position ``j`` of the indices, i.e. coordinate ``j`` of the low-rank space.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SIDES = ("auto", "smaller", "left", "right")

# (2i + 1) · k must fit in int32 (see _dct_columns): n <= 2**15 keeps it below 2**31 - 1.
MAX_DCT_SIZE = 2**15


class DctLowRankState(NamedTuple):
    """State of ``dct_low_rank``.

    ``indices`` mirrors the params' tree: an int32 [rank] array of DCT column numbers for each
    projected leaf, ``optax.MaskedNode()`` (no arrays) for leaves passed through at full rank.
    ``inner_state`` is the inner transformation's state for the tree of low-rank leaves.
    """

    count: jax.Array  # int32 []
    indices: optax.Params
    inner_state: optax.OptState


def _dct_columns(n: int, k: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Columns ``k`` of the orthonormal DCT-II basis of size ``n``: [n, len(k)].

    ``Q[i, k] = sqrt(2 / n) · c_k · cos(π (2i + 1) k / (2n))``, ``c_0 = 1/√2``, ``c_k = 1``.
    """
    compute = jnp.promote_types(dtype, jnp.float32)
    i = jnp.arange(n, dtype=jnp.int32)[:, None]
    k = jnp.asarray(k, jnp.int32)[None, :]
    # The cosine has period 4n in units of π / (2n): reducing the exact integer phase first
    # keeps the argument below 2π, so a float32 basis is accurate to ~1e-7 for any n.
    phase = ((2 * i + 1) * k) % (4 * n)
    q = jnp.cos(phase.astype(compute) * (math.pi / (2 * n)))
    c = jnp.where(k == 0, math.sqrt(0.5), 1.0).astype(compute)
    return (math.sqrt(2.0 / n) * c * q).astype(dtype)


def dct_basis(n: int, dtype=jnp.float32) -> jax.Array:
    """The orthonormal DCT-II basis of size ``n``, one basis vector per column.

    With ``i`` the sample (row) and ``k`` the frequency (column)::

        Q[i, k] = sqrt(2 / n) · c_k · cos(π (2i + 1) k / (2n)),   c_0 = 1/√2, c_k = 1 (k > 0)

    ``Qᵀ Q = Q Qᵀ = I``; ``x @ Q`` is the orthonormal DCT-II of the rows of ``x``
    (``scipy.fft.dct(x, norm='ortho', axis=-1)``), so ``Q`` is the transpose of scipy's
    ``dct(eye(n), norm='ortho', axis=0)``, and column 0 is the constant ``1/√n``.

    Args:
      n: size of the basis, 1 to 2**15.
      dtype: dtype of the result; computed in f32 (or wider) and cast.

    Returns:
      ``Q``: [n, n] of ``dtype``.

    Example:
      >>> q = dct_basis(64)
      >>> coeffs = g @ q                 # g: [m, 64] -> DCT coefficients of each row

    References:
      Ahmed, Natarajan & Rao, "Discrete Cosine Transform", IEEE Trans. Computers, 1974.
      Modoranu et al., arXiv:2505.17967 (the DCT as a fixed orthogonal basis).
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DCT_SIZE:
        raise ValueError(f"dct_basis n={n!r}: expected an int from 1 to {MAX_DCT_SIZE}.")
    return _dct_columns(n, jnp.arange(n), dtype)


def _check_args(inner, rank, update_interval, scale, min_dim, side) -> None:
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner={inner!r}: expected an optax.GradientTransformation.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_DCT_SIZE:
        raise ValueError(f"rank={rank!r}: expected an int from 1 to {MAX_DCT_SIZE}.")
    if (
        isinstance(update_interval, bool)
        or not isinstance(update_interval, int)
        or update_interval < 1
    ):
        raise ValueError(f"update_interval={update_interval!r}: expected a positive int.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r}: expected a finite float.")
    if min_dim is not None and (
        isinstance(min_dim, bool) or not isinstance(min_dim, int) or min_dim < 1
    ):
        raise ValueError(f"min_dim={min_dim!r}: expected None or a positive int.")
    if side not in SIDES:
        raise ValueError(f"side={side!r}: expected one of {SIDES}.")


def _project(x: jax.Array, qc: jax.Array, axis: int) -> jax.Array:
    """[m, n] -> [m, r] (axis 1: x Q_I) or [r, n] (axis 0: Q_Iᵀ x), in f32."""
    x = x.astype(jnp.float32)
    return x @ qc if axis == 1 else qc.T @ x


def _back_project(u: jax.Array, qc: jax.Array, axis: int) -> jax.Array:
    """[m, r] -> [m, n] (u Q_Iᵀ) or [r, n] -> [m, n] (Q_I u), in f32."""
    u = u.astype(jnp.float32)
    return u @ qc.T if axis == 1 else qc @ u


def _alignment_scores(g: jax.Array, axis: int) -> jax.Array:
    """ℓ1 norm of each column of ``S = G Q`` (axis 1) or row of ``S = Qᵀ G`` (axis 0): [n]."""
    q = dct_basis(g.shape[axis])
    s = _project(g, q, axis)
    return jnp.sum(jnp.abs(s), axis=1 - axis)


def _stable_slots(old: jax.Array, chosen: jax.Array) -> jax.Array:
    """Orders the set ``chosen`` so that each index also in ``old`` keeps its slot.

    Both are int32 [r] with distinct entries. New indices fill the freed slots in
    ``chosen``'s order (descending score).
    """
    kept = jnp.any(old[:, None] == chosen[None, :], axis=1)  # [r] old[j] is chosen again
    fresh = ~jnp.any(chosen[:, None] == old[None, :], axis=1)  # [r] chosen[j] is new
    fresh_first = chosen[jnp.argsort((~fresh).astype(jnp.int32), stable=True)]
    # |old \ chosen| = |chosen \ old|: the j-th freed slot takes the j-th new index.
    slot = jnp.maximum(jnp.cumsum(~kept) - 1, 0)
    return jnp.where(kept, old, fresh_first[slot]).astype(jnp.int32)


def dct_low_rank(
    inner: optax.GradientTransformation,
    rank: int,
    *,
    update_interval: int = 200,
    scale: float = 1.0,
    min_dim: int | None = None,
    side: str = "auto",
) -> optax.GradientTransformation:
    """Runs ``inner`` on gradients projected onto ``rank`` columns of a fixed DCT basis.

    For a 2-D gradient ``G`` [m, n] projected on its columns (``axis=1``), with ``Q`` =
    ``dct_basis(n)`` and ``t`` the step (from 0)::

        if t mod update_interval == 0:
            S = G Q                                   # [m, n] alignment with every column
            I = top-rank k by ‖S[:, k]‖₁              # int32 [rank], stored in the state
        G_r = G Q[:, I]                               # [m, rank]
        U_r, inner_state = inner.update(G_r, inner_state, P Q[:, I])
        U = scale · U_r Q[:, I]ᵀ                      # [m, n]

    and symmetrically ``S = Qᵀ G``, ``G_r = Q[:, I]ᵀ G`` [rank, n], ``U = scale · Q[:, I] U_r``
    on rows (``axis=0``, ``Q = dct_basis(m)``). ``inner`` sees one tree: low-rank leaves where
    projected, the others (not 2-D, smaller dimension below ``min_dim``, or a projected
    dimension shorter than ``rank``) unchanged and not scaled; its state therefore lives in
    the low-rank space. Params given to ``update`` are projected the same way, so a
    params-dependent ``inner`` (``adamw``'s weight decay) acts on ``P Q[:, I]``, i.e. within
    the subspace; put ``optax.add_decayed_weights`` after ``dct_low_rank`` in a chain for
    decay of the full weights.

    Choices (arXiv:2505.17967):
      * Columns are ranked by the ℓ1 norm of their alignment, as in the paper's dynamic
        column selection (its reference code's default norm is ℓ1); only the indices are
        stored, ``Q`` is rebuilt from its size.
      * Re-choosing happens inside the jitted update via ``lax.cond``, at ``t = 0`` and every
        ``update_interval`` steps. The default 200 is GaLore's subspace-change frequency (the
        baseline the paper compares with); the paper's reference code defaults to 1
        (re-choosing every step, an ``m·n²`` matmul per step).
      * ``inner``'s state is kept across index changes, not reset and not rotated (the paper's
        default: its optional rotation ``R = Q[:, I_old]ᵀ Q[:, I_new]`` is off by default, and
        for a generic ``inner`` the state's layout is unknown). The new set is written so that
        every basis vector kept from the old set keeps its slot, so its coordinate of the
        inner state stays exact (what the paper's rotation achieves for it); new vectors
        inherit the state of the slot they fill.
      * ``side="auto"`` projects the larger dimension (columns when square), so the low-rank
        state is [min(m, n), rank]; the paper's code projects the smaller one (``Q`` of size
        min(m, n), state [max(m, n), rank]), which is ``side="smaller"``.

    Cost: re-choosing is one matmul with the [n, n] basis (``m·n²`` flops, plus ``n²``
    cosines); other steps project with the ``rank`` selected columns only (``m·n·rank``).
    That dense matmul is fine for ``n`` up to a few thousand; beyond, an FFT-based DCT
    (the paper's Makhoul variant) would be needed, and ``init`` refuses a projected
    dimension above 2**15 (keep embeddings full-rank with ``optax.masked``, as the paper's
    code keeps layers with a dimension >= 32000). Projections run in f32; the low-rank
    gradient and the update have the gradient's dtype.

    Memory: per projected leaf, ``rank`` int32 indices plus ``inner``'s state for an
    [m, rank] (or [rank, n]) leaf instead of [m, n]; one int32 count.

    Args:
      inner: the transformation run in the low-rank space (e.g. ``adamw(lr, state_bits=8)``).
      rank: number of DCT columns kept per projected leaf.
      update_interval: steps between re-choosing the columns (step 0 included).
      scale: multiplies the back-projected update of projected leaves (GaLore's alpha).
      min_dim: smallest ``min(m, n)`` of a projected leaf; ``None`` means ``rank + 1``, so a
        leaf whose smaller dimension is at most ``rank`` stays full-rank.
      side: which dimension is projected: ``"auto"`` (the larger), ``"smaller"``, ``"left"``
        (rows, axis 0) or ``"right"`` (columns, axis 1).

    Returns:
      An ``optax.GradientTransformation`` with ``DctLowRankState``.

    Example:
      >>> opt = optax.chain(dct_low_rank(adamw(1e-3, state_bits=8), rank=128), ...)
      >>> state = opt.init(params)          # moments of a [1024, 4096] kernel: [1024, 128]

    References:
      Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
      Models" (v3+: "FFT-based Dynamic Subspace Selection ..."), arXiv:2505.17967, the DCT
      basis and dynamic column selection. Zhao et al., "GaLore", arXiv:2403.03507.
    """
    _check_args(inner, rank, update_interval, scale, min_dim, side)
    min_dim_ = rank + 1 if min_dim is None else min_dim

    def projected_axis(shape) -> int | None:
        if len(shape) != 2 or min(shape) < min_dim_:
            return None
        m, n = shape
        axis = {
            "auto": 1 if n >= m else 0,
            "smaller": 1 if n <= m else 0,
            "left": 0,
            "right": 1,
        }[side]
        return axis if shape[axis] >= rank else None

    def init_fn(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        indices, low = [], []
        for path, p in flat:
            axis = projected_axis(p.shape)
            if axis is None:
                indices.append(optax.MaskedNode())
                low.append(p)
                continue
            if p.shape[axis] > MAX_DCT_SIZE:
                # An [n, n] basis this large (embeddings, output layers) is not a sensible
                # matmul: say so here rather than fail inside XLA.
                raise ValueError(
                    f"dct_low_rank: leaf {jax.tree_util.keystr(path)} of shape {p.shape} "
                    f"would be projected along a dimension of {p.shape[axis]} > "
                    f"{MAX_DCT_SIZE}; exclude it (optax.masked) or use side='smaller'."
                )
            idx = jnp.arange(rank, dtype=jnp.int32)
            qc = _dct_columns(p.shape[axis], idx)
            indices.append(idx)
            low.append(_project(p, qc, axis).astype(p.dtype))
        return DctLowRankState(
            count=jnp.zeros([], jnp.int32),
            indices=treedef.unflatten(indices),
            inner_state=inner.init(treedef.unflatten(low)),
        )

    def update_fn(updates, state, params=None):
        flat_g, treedef = jax.tree.flatten(updates)
        flat_idx = treedef.flatten_up_to(state.indices)
        flat_p = [None] * len(flat_g) if params is None else treedef.flatten_up_to(params)
        rechoose = state.count % update_interval == 0

        new_indices, columns, low_g, low_p = [], [], [], []
        for g, idx, p in zip(flat_g, flat_idx, flat_p, strict=True):
            if isinstance(idx, optax.MaskedNode):
                new_indices.append(idx)
                columns.append(None)
                low_g.append(g)
                low_p.append(p)
                continue
            axis = projected_axis(g.shape)

            def choose(g, old, axis=axis):
                chosen = jax.lax.top_k(_alignment_scores(g, axis), rank)[1]
                return _stable_slots(old, chosen)

            # A traced predicate: only the taken branch runs (both under vmap).
            idx = jax.lax.cond(rechoose, choose, lambda g, old: old, g, idx)
            qc = _dct_columns(g.shape[axis], idx)  # [n, rank], the only part of Q needed
            new_indices.append(idx)
            columns.append((qc, axis))
            low_g.append(_project(g, qc, axis).astype(g.dtype))
            low_p.append(None if p is None else _project(p, qc, axis).astype(p.dtype))

        low_params = None if params is None else treedef.unflatten(low_p)
        low_u, inner_state = inner.update(treedef.unflatten(low_g), state.inner_state, low_params)
        flat_u = treedef.flatten_up_to(low_u)
        out = []
        for g, u, col in zip(flat_g, flat_u, columns, strict=True):
            if col is None:
                out.append(u)
                continue
            qc, axis = col
            out.append((scale * _back_project(u, qc, axis)).astype(g.dtype))
        new_state = DctLowRankState(
            count=optax.safe_increment(state.count),
            indices=treedef.unflatten(new_indices),
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
