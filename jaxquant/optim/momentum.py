"""Lion and SGD with momentum whose momentum can be stored in 8 or 4 bits between steps.

Terminology:
  momentum:  the one state of these optimizers, a signed running average of gradients; stored
             as a first moment of ``storage.RECIPES`` (8-bit dynamic or E4M3, block 256;
             4-bit NF4, block 32, stochastic rounding; f32 below ``min_quantized_size``
             elements).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant.optim import storage as storage_lib
from jaxquant.optim.storage import check_mu_dtype


class MomentumState(NamedTuple):
    """State of ``scale_by_lion`` and ``trace``: the momentum mirrors the params' tree, each
    leaf an f32 array or a ``QuantizedMoment``."""

    count: jax.Array  # int32 []
    mu: optax.Updates


def _first_moment_storage(state_bits, state_format, block_size, min_quantized_size, rounding):
    return storage_lib.moment_storage(
        state_bits,
        state_format,
        block_size=block_size,
        min_quantized_size=min_quantized_size,
        rounding=rounding,
    )


def _momentum_transform(store, step, dtype=None) -> optax.GradientTransformation:
    """init/update over the momentum tree; ``step(g32, mu32) -> (u32, new_mu32)``; ``dtype``
    (state_bits=32 only) is the stored momentum's dtype."""

    def stored(mu, key=None):
        mu = store.store_first(mu, key)
        return mu if dtype is None else mu.astype(dtype)

    def init_fn(params):
        mu = jax.tree.map(lambda p: stored(jnp.zeros(p.shape, jnp.float32)), params)
        return MomentumState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates, state, params=None):
        del params

        count = optax.safe_increment(state.count)

        def leaf(g, mu, key):
            u, mu = step(g.astype(jnp.float32), storage_lib.load(mu).astype(jnp.float32))
            return u.astype(g.dtype), stored(mu, key)

        keys = store.keys(updates, count)
        out = jax.tree.map(leaf, updates, state.mu, keys, is_leaf=lambda x: x is None)
        treedef = jax.tree.structure(updates)
        parts = treedef.flatten_up_to(out)
        new_updates = treedef.unflatten([p[0] for p in parts])
        mu = treedef.unflatten([p[1] for p in parts])
        return new_updates, MomentumState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype=None,
    *,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int | None = None,
    rounding: str | None = None,
) -> optax.GradientTransformation:
    """Lion's sign update, its momentum optionally stored in 8 or 4 bits.

    ::

        u  = sign(b1 · mu + (1 − b1) · g),      mu = b2 · mu + (1 − b2) · g

    The momentum is dequantized, updated in f32 and requantized in the one jitted update
    (``storage.RECIPES``' first-moment quantizer). ``state_bits=32`` equals
    ``optax.scale_by_lion``.

    Args:
      b1: interpolation of momentum and gradient inside the sign.
      b2: decay of the momentum.
      mu_dtype: the momentum's dtype at ``state_bits=32`` (None: f32); an error at 8 or 4 bits.
      state_bits, state_format, block_size, min_quantized_size, rounding: as
        ``adam.scale_by_adam``. Lion's slow momentum (``b2=0.99``) is where stochastic
        rounding matters most: with nearest rounding an 8-bit momentum freezes wherever
        ``0.01 · g`` is below half a map step. At 4 bits even stochastic rounding leaves Lion
        22-24% above f32 Lion's loss on a converging regression (BENCHMARKS.md): its sign
        update flips wherever the momentum's rounding noise exceeds ``|b1·mu + (1 − b1)·g|``.
        Prefer 8 bits for Lion.

    Returns:
      An ``optax.GradientTransformation`` with ``MomentumState``.

    References:
      Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, Alg. 2.
    """
    store = _first_moment_storage(
        state_bits, state_format, block_size, min_quantized_size, rounding
    )

    def step(g, mu):
        return jnp.sign(b1 * mu + (1 - b1) * g), b2 * mu + (1 - b2) * g

    return _momentum_transform(store, step, check_mu_dtype(mu_dtype, state_bits))


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype=None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask=None,
    *,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int | None = None,
    rounding: str | None = None,
) -> optax.GradientTransformation:
    """Lion with optionally 8- or 4-bit momentum: ``scale_by_lion``, decoupled weight decay,
    −lr (the chain of ``optax.lion``, which ``state_bits=32`` reproduces; its arguments are
    accepted in their positions).

    Example:
      >>> opt = lion(3e-4, state_bits=8)          # 1.02 bytes of state per large param
    """
    return optax.chain(
        scale_by_lion(
            b1,
            b2,
            mu_dtype,
            state_bits=state_bits,
            state_format=state_format,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
            rounding=rounding,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def trace(
    decay: float,
    nesterov: bool = False,
    accumulator_dtype=None,
    *,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int | None = None,
    rounding: str | None = None,
) -> optax.GradientTransformation:
    """Momentum (heavy ball or Nesterov), its trace optionally stored in 8 or 4 bits.

    ::

        mu = g + decay · mu,     u = g + decay · mu  (nesterov)  or  u = mu

    ``state_bits=32`` equals ``optax.trace`` (``accumulator_dtype``: the trace's dtype there;
    an error at 8 or 4 bits, where the recipe stores it).
    """
    store = _first_moment_storage(
        state_bits, state_format, block_size, min_quantized_size, rounding
    )

    def step(g, mu):
        mu = g + decay * mu
        return (g + decay * mu if nesterov else mu), mu

    return _momentum_transform(store, step, check_mu_dtype(accumulator_dtype, state_bits))


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype=None,
    *,
    state_bits: int | None = None,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int | None = None,
    rounding: str | None = None,
) -> optax.GradientTransformation:
    """SGD, with momentum stored in 8 or 4 bits when ``momentum`` is set (``trace``, then −lr;
    ``optax.sgd`` at ``state_bits=32``). Without momentum there is no state to store, and
    ``state_bits`` other than 32 is an error.
    """
    if momentum is None:
        storage_lib.check_recipe(state_bits, state_format, block_size, min_quantized_size)
        if state_bits not in (None, 32):
            raise ValueError(
                f"sgd state_bits={state_bits}: SGD without momentum keeps no state; pass "
                "momentum= to store it in fewer bits."
            )
        return optax.scale_by_learning_rate(learning_rate)
    return optax.chain(
        trace(
            momentum,
            nesterov,
            accumulator_dtype,
            state_bits=state_bits,
            state_format=state_format,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
            rounding=rounding,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
