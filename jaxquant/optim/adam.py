"""Adam and AdamW whose moments can be stored in 8 bits between steps.

Terminology:
  state_bits:          32 (plain f32 moments) or 8 (block-wise dynamic-map codes).
  min_quantized_size:  leaves smaller than this keep f32 moments (biases, norms): their
                       memory is negligible and they are the most sensitive.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant.optim.state import QuantizedState, dequantize_state, quantize_state

STATE_BITS = (32, 8)


class ScaleByAdamState(NamedTuple):
    """State of ``scale_by_adam``: moments mirror the params' tree, each leaf an f32 array or a
    ``QuantizedState``."""

    count: jax.Array  # int32 []
    mu: optax.Updates
    nu: optax.Updates


def _check_args(state_bits, block_size, min_quantized_size) -> None:
    if state_bits not in STATE_BITS or isinstance(state_bits, bool):
        raise ValueError(
            f"state_bits={state_bits!r}: expected 32 or 8 (4-bit states are not implemented "
            "yet; they come in a later change)."
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: expected a positive int.")
    if (
        isinstance(min_quantized_size, bool)
        or not isinstance(min_quantized_size, int)
        or min_quantized_size < 0
    ):
        raise ValueError(f"min_quantized_size={min_quantized_size!r}: expected an int >= 0.")


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    state_bits: int = 32,
    block_size: int = 256,
    min_quantized_size: int = 4096,
) -> optax.GradientTransformation:
    """Rescales updates by Adam's bias-corrected moments, optionally stored in 8 bits.

    With ``g`` the gradient and ``t`` the step (from 1)::

        mu = b1 · mu + (1 − b1) · g,      nu = b2 · nu + (1 − b2) · g²
        u  = (mu / (1 − b1**t)) / (sqrt(nu / (1 − b2**t)) + eps)

    With ``state_bits=8`` each step dequantizes the stored moments, does the arithmetic above
    in f32, computes ``u`` from the f32 moments and requantizes them for storage: ``mu`` on
    the signed dynamic map with the sign nudge, ``nu`` on the unsigned one, one f32 absmax per
    ``block_size`` elements (``quantize_state``). Leaves with fewer than
    ``min_quantized_size`` elements keep f32 moments. ``state_bits=32`` equals
    ``optax.scale_by_adam`` on f32 params (the moments are f32 whatever the param dtype; the
    update has the gradient's dtype).

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator outside the square root.
      state_bits: 32 or 8.
      block_size: elements per absmax scale of 8-bit states.
      min_quantized_size: smallest leaf whose moments are quantized.

    Returns:
      An ``optax.GradientTransformation`` with ``ScaleByAdamState``.

    References:
      Kingma & Ba, "Adam", arXiv:1412.6980, Algorithm 1. Dettmers et al., "8-bit Optimizers
      via Block-wise Quantization", arXiv:2110.02861, Sec. 2.
    """
    _check_args(state_bits, block_size, min_quantized_size)

    def store(x, signed):
        if state_bits == 8 and x.size >= min_quantized_size:
            return quantize_state(x, signed=signed, bits=8, block_size=block_size)
        return x

    def load(m):
        return dequantize_state(m) if isinstance(m, QuantizedState) else m

    def init_fn(params):
        def init(p):
            z = jnp.zeros(p.shape, jnp.float32)
            return store(z, True), store(z, False)

        moments = jax.tree.map(init, params)
        mu, nu = _unzip(params, moments, 2)
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        bc1 = 1 - b1**count
        bc2 = 1 - b2**count

        def step(g, mu, nu):
            g32 = g.astype(jnp.float32)
            mu = (1 - b1) * g32 + b1 * load(mu)
            nu = (1 - b2) * (g32 * g32) + b2 * load(nu)
            # The update uses the f32 moments of this step; only storage is quantized.
            u = (mu / bc1) / (jnp.sqrt(nu / bc2) + eps)
            return u.astype(g.dtype), store(mu, True), store(nu, False)

        # mu and nu have the updates' structure down to its leaves, where they may hold a
        # QuantizedState subtree: tree.map hands that subtree to `step` whole.
        out = jax.tree.map(step, updates, state.mu, state.nu)
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
    block_size: int = 256,
    min_quantized_size: int = 4096,
    mask=None,
) -> optax.GradientTransformation:
    """AdamW with optionally 8-bit moments: ``scale_by_adam``, decoupled weight decay, −lr.

    ``p ← p − lr_t · (u + weight_decay · p)`` with ``u`` from ``scale_by_adam``; the same chain
    as ``optax.adamw``, which ``state_bits=32`` reproduces.

    Args:
      learning_rate: a float or an optax schedule of the step.
      b1, b2, eps: Adam's decays and denominator constant.
      weight_decay: decoupled weight decay.
      state_bits: 32 (f32 moments) or 8 (8-bit block-wise dynamic-map moments).
      block_size: elements per absmax scale of 8-bit moments.
      min_quantized_size: leaves with fewer elements keep f32 moments.
      mask: as ``optax.add_decayed_weights``: a tree (or function of params) of bools saying
        which leaves decay.

    Returns:
      An ``optax.GradientTransformation``; its state is a tuple whose first element is the
      ``ScaleByAdamState``.

    Example:
      >>> opt = adamw(1e-3, state_bits=8)
      >>> state = opt.init(params)
      >>> bytes_per_param(state, params)          # ≈ 2.03 for large leaves

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.
    """
    return optax.chain(
        scale_by_adam(
            b1,
            b2,
            eps,
            state_bits=state_bits,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
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
    block_size: int = 256,
    min_quantized_size: int = 4096,
) -> optax.GradientTransformation:
    """Adam with optionally 8-bit moments: ``adamw`` without weight decay (the chain of
    ``scale_by_adam`` and −lr, as ``optax.adam``). Arguments as ``adamw``."""
    return optax.chain(
        scale_by_adam(
            b1,
            b2,
            eps,
            state_bits=state_bits,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
