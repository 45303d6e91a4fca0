"""Adam and AdamW whose moments can be stored in 8 or 4 bits between steps.

Terminology:
  state_bits:          32 (f32 moments), 8 or 4.
  state_format:        how the moments are stored at those bits (``storage.RECIPES``):
                       8-bit ``'dynamic'`` (default) or ``'e4m3'``; 4-bit ``'rank1'`` (default)
                       or ``'factorized'``.
  min_quantized_size:  leaves smaller than this keep f32 moments (biases, norms): their
                       memory is negligible and they are the most sensitive.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant.optim import storage as storage_lib


class ScaleByAdamState(NamedTuple):
    """State of ``scale_by_adam``: moments mirror the params' tree, each leaf an f32 array, a
    ``QuantizedMoment`` or (second moment, ``'factorized'``) a ``FactoredMoment``."""

    count: jax.Array  # int32 []
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    state_bits: int = 32,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int = 4096,
    rounding: str = "nearest",
) -> optax.GradientTransformation:
    """Rescales updates by Adam's bias-corrected moments, optionally stored in 8 or 4 bits.

    With ``g`` the gradient and ``t`` the step (from 1)::

        mu = b1 · mu + (1 − b1) · g,      nu = b2 · nu + (1 − b2) · g²
        u  = (mu / (1 − b1**t)) / (sqrt(nu / (1 − b2**t)) + eps)

    With ``state_bits`` 8 or 4 each step dequantizes the stored moments, does the arithmetic
    above in f32, computes ``u`` from the f32 moments and requantizes them for storage, all in
    the one jitted update. How (``storage.RECIPES``):

    * 8-bit ``'dynamic'`` (bitsandbytes): block-wise absmax (block 256) on the signed dynamic
      map with the sign nudge (``mu``) and the unsigned one (``nu``); 2.03 bytes/param.
    * 8-bit ``'e4m3'``: FP8 E4M3 codes, block-wise absmax (block 256) to 448; 2.03 bytes/param.
    * 4-bit ``'rank1'`` (4-bit Adam): ``mu`` on the 4-bit dynamic map, block 128; ``nu`` on the
      linear map without zero (``maps.linear_map``) under rank-1 normalization
      ``n[i, j] = min(rowmax_i, colmax_j)``; about 1.04 bytes/param.
    * 4-bit ``'factorized'``: ``mu`` as above; ``nu`` of rank >= 2 factored into f32 row and
      column averages (Adafactor; ``u`` uses their rank-1 reconstruction); about 0.53.

    Leaves with fewer than ``min_quantized_size`` elements keep f32 moments. ``state_bits=32``
    equals ``optax.scale_by_adam`` on f32 params (the moments are f32 whatever the param
    dtype; the update has the gradient's dtype).

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator outside the square root.
      state_bits: 32, 8 or 4.
      state_format: the recipe at those bits (default ``'dynamic'`` for 8, ``'rank1'`` for 4).
      block_size: elements per absmax scale; default the recipe's (256 for 8-bit, 128 for
        4-bit).
      min_quantized_size: smallest leaf whose moments are quantized.
      rounding: ``'nearest'`` or ``'stochastic'`` requantization of the moments. Stochastic
        rounding is unbiased, so a slow EMA (``b2`` near 1, Lion's momentum) keeps moving
        when its per-step change is below half a map step, where nearest rounding freezes
        it; the keys come from the step count (reproducible, nothing stored).

    Returns:
      An ``optax.GradientTransformation`` with ``ScaleByAdamState``.

    References:
      Kingma & Ba, "Adam", arXiv:1412.6980, Algorithm 1. Dettmers et al., "8-bit Optimizers
      via Block-wise Quantization", arXiv:2110.02861, Sec. 2. Li et al., "Memory Efficient
      Optimizers with 4-bit States", arXiv:2309.01507, Sec. 3-4 (4-bit, rank-1, factorized).
    """
    store = storage_lib.moment_storage(
        state_bits,
        state_format,
        block_size=block_size,
        min_quantized_size=min_quantized_size,
        rounding=rounding,
    )

    def init_fn(params):
        def init(p):
            return store.store_first(jnp.zeros(p.shape, jnp.float32)), store.init_second(p.shape)

        mu, nu = _unzip(params, jax.tree.map(init, params), 2)
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        bc1 = 1 - b1**count
        bc2 = 1 - b2**count

        def step(g, mu, nu, key):
            k1, k2 = (None, None) if key is None else jax.random.split(key)
            g32 = g.astype(jnp.float32)
            mu = (1 - b1) * g32 + b1 * storage_lib.load(mu)
            nu, nu_stored = store.update_second(nu, g32 * g32, b2, k2)
            # The update uses the f32 moments of this step; only storage is quantized.
            u = (mu / bc1) / (jnp.sqrt(nu / bc2) + eps)
            return u.astype(g.dtype), store.store_first(mu, k1), nu_stored

        # mu and nu have the updates' structure down to its leaves, where they may hold a
        # QuantizedMoment or FactoredMoment subtree: tree.map hands that subtree to `step` whole.
        keys = store.keys(updates, count)
        out = jax.tree.map(step, updates, state.mu, state.nu, keys, is_leaf=lambda x: x is None)
        new_updates, mu, nu = _unzip(updates, out, 3)
        return new_updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _unzip(like, tree_of_tuples, n: int):
    treedef = jax.tree.structure(like)
    parts = treedef.flatten_up_to(tree_of_tuples)
    return tuple(treedef.unflatten([p[i] for p in parts]) for i in range(n))


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    state_bits: int = 32,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int = 4096,
    rounding: str = "nearest",
    mask=None,
) -> optax.GradientTransformation:
    """AdamW with optionally 8- or 4-bit moments: ``scale_by_adam``, decoupled weight decay, −lr.

    ``p ← p − lr_t · (u + weight_decay · p)`` with ``u`` from ``scale_by_adam``; the same chain
    as ``optax.adamw``, which ``state_bits=32`` reproduces.

    Args:
      learning_rate: a float or an optax schedule of the step.
      b1, b2, eps: Adam's decays and denominator constant.
      weight_decay: decoupled weight decay.
      state_bits: 32 (f32 moments), 8 or 4 (see ``scale_by_adam``).
      state_format: 8-bit ``'dynamic'`` (default) or ``'e4m3'``; 4-bit ``'rank1'`` (default)
        or ``'factorized'``.
      block_size: elements per absmax scale (default 256 for 8-bit, 128 for 4-bit).
      min_quantized_size: leaves with fewer elements keep f32 moments.
      rounding: ``'nearest'`` or ``'stochastic'`` requantization (``scale_by_adam``).
      mask: as ``optax.add_decayed_weights``: a tree (or function of params) of bools saying
        which leaves decay.

    Returns:
      An ``optax.GradientTransformation``; its state is a tuple whose first element is the
      ``ScaleByAdamState``.

    Example:
      >>> opt = adamw(1e-3, state_bits=4)
      >>> state = opt.init(params)
      >>> bytes_per_param(state, params)          # ≈ 1.04 for large leaves

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.
      Li et al., "Memory Efficient Optimizers with 4-bit States", arXiv:2309.01507.
    """
    return optax.chain(
        scale_by_adam(
            b1,
            b2,
            eps,
            state_bits=state_bits,
            state_format=state_format,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
            rounding=rounding,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    state_bits: int = 32,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int = 4096,
    rounding: str = "nearest",
) -> optax.GradientTransformation:
    """Adam with optionally 8- or 4-bit moments: ``adamw`` without weight decay (the chain of
    ``scale_by_adam`` and −lr, as ``optax.adam``). Arguments as ``adamw``."""
    return optax.chain(
        scale_by_adam(
            b1,
            b2,
            eps,
            state_bits=state_bits,
            state_format=state_format,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
            rounding=rounding,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
