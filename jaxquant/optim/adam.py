"""Adam and AdamW whose moments can be stored in 8 or 4 bits between steps.

Terminology:
  state_bits:          32 (f32 moments), 8 or 4.
  state_format:        how the moments are stored at those bits (``storage.RECIPES``):
                       8-bit ``'dynamic'`` (default) or ``'e4m3'``; 4-bit ``'factorized'`` (default)
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
    eps_root: float = 0.0,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int | None = None,
    rounding: str | None = None,
) -> optax.GradientTransformation:
    """Rescales updates by Adam's bias-corrected moments, optionally stored in 8 or 4 bits.

    With ``g`` the gradient and ``t`` the step (from 1)::

        mu = b1 · mu + (1 − b1) · g,      nu = b2 · nu + (1 − b2) · g²
        m̂ = mu / (1 − b1**t)               (Nesterov: b1 · mu / (1 − b1**(t+1))
                                                       + (1 − b1) · g / (1 − b1**t))
        u  = m̂ / (sqrt(nu / (1 − b2**t) + eps_root) + eps)

    With ``state_bits`` 8 or 4 each step dequantizes the stored moments, does the arithmetic
    above in f32, computes ``u`` from the f32 moments and requantizes them for storage, all in
    the one jitted update. How (``storage.RECIPES``):

    * 8-bit ``'dynamic'`` (bitsandbytes): block-wise absmax (block 256) on the signed dynamic
      map with the sign nudge (``mu``) and the unsigned one (``nu``); 2.03 bytes/param.
    * 8-bit ``'e4m3'``: FP8 E4M3 codes, block-wise absmax (block 256) to 448; 2.03 bytes/param.
    * 4-bit ``'factorized'`` (the default): ``mu`` on the NF4 map, block 32; ``nu`` of rank
      >= 2 factored into f32 row and column averages (Adafactor; ``u`` uses their rank-1
      reconstruction); stochastic rounding; about 0.66 bytes/param.
    * 4-bit ``'rank1'``: ``mu`` on the NF4 map, block 128; ``nu`` on the linear map without
      zero (``maps.linear_map``) under rank-1 normalization ``n[i, j] = min(rowmax_i,
      colmax_j)``; stochastic rounding; about 1.04 bytes/param.
    * 4-bit ``'rank1_dynamic'``: 4-bit Adam's recipe exactly (``mu`` on the 4-bit dynamic
      map, nearest rounding). ``storage``'s docstring says, with the measurements behind it,
      why it is not the default: it falls behind f32 on long, converging fits.

    Leaves with fewer than ``min_quantized_size`` elements keep f32 moments. ``state_bits=32``
    equals ``optax.scale_by_adam`` on f32 params (the moments are f32 whatever the param
    dtype unless ``mu_dtype`` says otherwise; the update has the gradient's dtype).

    The positional arguments are ``optax.scale_by_adam``'s, in its order.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator outside the square root.
      eps_root: added to the bias-corrected second moment inside the square root.
      mu_dtype: dtype of the stored first moment at ``state_bits=32`` (e.g. ``jnp.bfloat16``);
        None keeps f32. At 8 or 4 bits the recipe decides, and ``mu_dtype`` is an error.
      nesterov: Nesterov's momentum in the numerator (NAdam, as ``optax``'s ``nesterov``).
      state_bits: 32, 8 or 4.
      state_format: the recipe at those bits (default ``'dynamic'`` for 8, ``'factorized'``
        for 4).
      block_size: elements per absmax scale; default the recipe's (256 for 8-bit, 32 for
        ``'factorized'``, 128 for the other 4-bit recipes).
      min_quantized_size: smallest leaf whose moments are quantized.
      rounding: ``'nearest'`` or ``'stochastic'`` requantization of the moments; None: the
        recipe's default (``storage.DEFAULT_ROUNDING``: stochastic for the 4-bit
        ``'factorized'`` and ``'rank1'``, nearest otherwise). Stochastic rounding is
        unbiased, so a slow EMA (``b2`` near 1, Lion's momentum) keeps moving when its
        per-step change is below half a map step, where nearest rounding freezes it; the
        keys come from the step count (reproducible, nothing stored).

    Returns:
      An ``optax.GradientTransformation`` with ``ScaleByAdamState``.

    References:
      Kingma & Ba, "Adam", arXiv:1412.6980, Algorithm 1. Dozat, "Incorporating Nesterov
      Momentum into Adam" (2016). Dettmers et al., "8-bit Optimizers via Block-wise
      Quantization", arXiv:2110.02861, Sec. 2. Li et al., "Memory Efficient Optimizers with
      4-bit States", arXiv:2309.01507, Sec. 3-4 (4-bit, rank-1, factorized).
    """
    store = storage_lib.moment_storage(
        state_bits,
        state_format,
        block_size=block_size,
        min_quantized_size=min_quantized_size,
        rounding=rounding,
    )
    mu_dtype = storage_lib.check_mu_dtype(mu_dtype, state_bits)
    leaf_step = AdamLeafStep(store, b1, b2, eps, eps_root, nesterov, mu_dtype)

    def init_fn(params):
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=leaf_step.init_first(params),
            nu=leaf_step.init_second(params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def step(g, mu, nu, key):
            u, _, mu, nu = leaf_step(g, mu, nu, count, key)
            return u, mu, nu

        # mu and nu have the updates' structure down to its leaves, where they may hold a
        # QuantizedMoment or FactoredMoment subtree: tree.map hands that subtree to `step` whole.
        keys = store.keys(updates, count)
        out = jax.tree.map(step, updates, state.mu, state.nu, keys, is_leaf=lambda x: x is None)
        new_updates, mu, nu = _unzip(updates, out, 3)
        return new_updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class AdamLeafStep:
    """Adam's step on one leaf, shared by ``scale_by_adam`` and Shampoo's Adam graft.

    ``__call__(g, mu, nu, count, key) -> (u, m_hat, mu, nu)``: the update (gradient dtype),
    the f32 bias-corrected (or Nesterov) first moment, and both moments as stored.
    """

    def __init__(self, store, b1, b2, eps, eps_root=0.0, nesterov=False, mu_dtype=None):
        self.store, self.b1, self.b2, self.eps = store, b1, b2, eps
        self.eps_root, self.nesterov, self.mu_dtype = eps_root, nesterov, mu_dtype

    def init_first(self, params):
        def init(p):
            mu = self.store.store_first(jnp.zeros(p.shape, jnp.float32))
            return mu if self.mu_dtype is None else mu.astype(self.mu_dtype)

        return jax.tree.map(init, params)

    def init_second(self, params):
        return jax.tree.map(lambda p: self.store.init_second(p.shape), params)

    def __call__(self, g, mu, nu, count, key=None):
        b1, b2 = self.b1, self.b2
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        g32 = g.astype(jnp.float32)
        mu = (1 - b1) * g32 + b1 * storage_lib.load(mu).astype(jnp.float32)
        nu, nu_stored = self.store.update_second(nu, g32 * g32, b2, k2)
        if self.nesterov:
            m_hat = b1 * mu / (1 - b1 ** (count + 1)) + (1 - b1) * g32 / (1 - b1**count)
        else:
            m_hat = mu / (1 - b1**count)
        # The update uses the f32 moments of this step; only storage is quantized.
        u = m_hat / (jnp.sqrt(nu / (1 - b2**count) + self.eps_root) + self.eps)
        mu_stored = self.store.store_first(mu, k1)
        if self.mu_dtype is not None:
            mu_stored = mu_stored.astype(self.mu_dtype)
        return u.astype(g.dtype), m_hat, mu_stored, nu_stored


def _unzip(like, tree_of_tuples, n: int):
    treedef = jax.tree.structure(like)
    parts = treedef.flatten_up_to(tree_of_tuples)
    return tuple(treedef.unflatten([p[i] for p in parts]) for i in range(n))


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask=None,
    *,
    nesterov: bool = False,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int | None = None,
    rounding: str | None = None,
) -> optax.GradientTransformation:
    """AdamW with optionally 8- or 4-bit moments: ``scale_by_adam``, decoupled weight decay, −lr.

    ``p ← p − lr_t · (u + weight_decay · p)`` with ``u`` from ``scale_by_adam``; the same chain
    as ``optax.adamw``, which ``state_bits=32`` reproduces. Every argument of ``optax.adamw``
    is accepted in its position, so ``adamw`` drops in for it; the storage arguments are
    keyword-only.

    Args:
      learning_rate: a float or an optax schedule of the step.
      b1, b2, eps, eps_root: Adam's decays and denominator constants (``scale_by_adam``).
      mu_dtype: the first moment's dtype at ``state_bits=32`` (``scale_by_adam``).
      weight_decay: decoupled weight decay (a float or a schedule).
      mask: as ``optax.add_decayed_weights``: a tree (or function of params) of bools saying
        which leaves decay.
      nesterov: NAdam's numerator (``scale_by_adam``).
      state_bits: 32 (f32 moments), 8 or 4 (see ``scale_by_adam``).
      state_format: 8-bit ``'dynamic'`` (default) or ``'e4m3'``; 4-bit ``'factorized'``
        (default), ``'rank1'`` or ``'rank1_dynamic'``.
      block_size: elements per absmax scale (default: the recipe's, ``scale_by_adam``).
      min_quantized_size: leaves with fewer elements keep f32 moments.
      rounding: ``'nearest'``, ``'stochastic'`` or None, the recipe's (``scale_by_adam``).

    Returns:
      An ``optax.GradientTransformation``; its state is a tuple whose first element is the
      ``ScaleByAdamState``.

    Example:
      >>> opt = adamw(1e-3, state_bits=4)
      >>> state = opt.init(params)
      >>> bytes_per_param(state, params)          # ≈ 0.66 for large leaves

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
            eps_root,
            mu_dtype,
            nesterov=nesterov,
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
    eps_root: float = 0.0,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int | None = None,
    rounding: str | None = None,
) -> optax.GradientTransformation:
    """Adam with optionally 8- or 4-bit moments: ``adamw`` without weight decay (the chain of
    ``scale_by_adam`` and −lr, as ``optax.adam``, whose arguments it takes in their positions).
    Arguments as ``adamw``."""
    return optax.chain(
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nesterov=nesterov,
            state_bits=state_bits,
            state_format=state_format,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
            rounding=rounding,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
