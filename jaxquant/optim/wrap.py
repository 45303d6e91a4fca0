"""``quantized_state``: store the state of any optax transformation in 8 or 4 bits.

Terminology:
  inner:          the wrapped ``optax.GradientTransformation``; its arithmetic is untouched.
  leaf path:      a state leaf's key path joined by ``/`` (``jax.tree_util.keystr(...,
                  simple=True, separator='/')``), e.g. ``0/nu/Dense_0/kernel`` for the
                  ``nu`` of ``optax.adam``.
  second moment:  a leaf whose path matches ``second_moment`` (a regex): stored with the
                  recipe's non-negative quantizer; every other float leaf is a first moment.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant.optim import storage as storage_lib
from jaxquant.optim.state import QuantizedMoment


class CompressedState(NamedTuple):
    """State of ``quantized_state``: the inner state with its large float leaves stored as
    ``QuantizedMoment`` (or ``FactoredMoment``) subtrees."""

    count: jax.Array  # int32 [], the step (for stochastic rounding's keys)
    inner: optax.OptState


def _is_stored(x) -> bool:
    return isinstance(x, (QuantizedMoment, storage_lib.FactoredMoment))


def quantized_state(
    inner: optax.GradientTransformation,
    *,
    state_bits: int = 8,
    state_format: str | None = None,
    block_size: int | None = None,
    min_quantized_size: int = 4096,
    rounding: str | None = None,
    second_moment: str | None = r"(^|/)nu(/|$)",
) -> optax.GradientTransformation:
    """Wraps an optax transformation so its state is stored quantized between steps.

    Each update dequantizes the stored state to f32, runs ``inner.update`` unchanged and
    quantizes the new state, inside the caller's jit. Float leaves of at least
    ``min_quantized_size`` elements are stored by the recipe of ``(state_bits, state_format)``
    (``storage.RECIPES``): leaves whose path matches ``second_moment`` as second moments (the
    unsigned dynamic map, E4M3, rank-1 linear map, or factored into row and column averages
    for ``'factorized'``), all others as first moments (signed). Integer leaves (step counts)
    and small leaves are kept as they are.

    A non-negative state stored as a first moment loses one bit to the sign; a signed state
    matched by ``second_moment`` is clipped to 0 or worse, so the regex must only match
    non-negative leaves. A factored second moment keeps exactly Adafactor's row and column
    averages (the rank-1 reconstruction ``row·col/mean(row)`` has the stored row and column
    means, so an EMA step on it moves them as Adafactor's would); the step's own update,
    computed by ``inner``, sees its full ``v_t = b2·v̂ + (1 − b2)·g²``.

    Args:
      inner: any ``optax.GradientTransformation`` whose state is a pytree of arrays.
      state_bits: 8 or 4 (32 keeps the inner state; the wrapper is then the identity).
      state_format: as ``adam.scale_by_adam``.
      block_size: elements per absmax scale (default the recipe's).
      min_quantized_size: smaller leaves stay as they are.
      rounding: ``'nearest'``, ``'stochastic'`` or None, the recipe's (``adam.scale_by_adam``).
      second_moment: regex over leaf paths selecting non-negative leaves, or None.

    Returns:
      An ``optax.GradientTransformation`` with ``CompressedState``.

    Example:
      >>> opt = quantized_state(optax.adafactor(1e-3), state_bits=8, second_moment=r"v_")
      >>> opt = quantized_state(optax.adam(1e-3), state_bits=4)    # like adam(state_bits=4)
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(
            f"quantized_state inner={inner!r}: expected an optax.GradientTransformation."
        )
    store = storage_lib.moment_storage(
        state_bits,
        state_format,
        block_size=block_size,
        min_quantized_size=min_quantized_size,
        rounding=rounding,
    )
    try:
        pattern = re.compile(second_moment) if second_moment is not None else None
    except re.error as e:
        raise ValueError(f"quantized_state second_moment={second_moment!r}: {e}.") from e

    def compress_leaf(path, x, key):
        if not (isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 1):
            return x
        if x.size < min_quantized_size:
            return x
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        x = x.astype(jnp.float32)
        if pattern is not None and pattern.search(name):
            if store.factors(x.shape):
                return storage_lib.FactoredMoment(jnp.mean(x, axis=-1), jnp.mean(x, axis=-2))
            return store.store_second(x, key)
        return store.store_first(x, key)

    def compress(state, count):
        keys = store.keys(state, count)
        return jax.tree_util.tree_map_with_path(
            compress_leaf, state, keys, is_leaf=lambda x: x is None
        )

    def decompress(stored, like):
        # `like` is the abstract inner state: restores each leaf's dtype.
        return jax.tree.map(
            lambda s, a: storage_lib.load(s).astype(a.dtype) if _is_stored(s) else s,
            stored,
            like,
            is_leaf=_is_stored,
        )

    def init_fn(params):
        count = jnp.zeros([], jnp.int32)
        return CompressedState(count, compress(inner.init(params), count))

    def update_fn(updates, state, params=None):
        like = jax.eval_shape(inner.init, params if params is not None else updates)
        u, new = inner.update(updates, decompress(state.inner, like), params)
        count = optax.safe_increment(state.count)
        return u, CompressedState(count, compress(new, count))

    return optax.GradientTransformation(init_fn, update_fn)
