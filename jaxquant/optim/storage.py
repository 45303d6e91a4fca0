"""Which quantizer stores which moment: the ``state_bits`` / ``state_format`` recipes.

Terminology:
  first moment:   a signed running average (Adam's ``mu``, Lion's and SGD's momentum).
  second moment:  a non-negative running average of squares (Adam's ``nu``).
  recipe:         a ``(state_bits, state_format)`` pair naming how both are stored.
  factored:       a second moment of rank >= 2 kept as f32 row and column averages over its
                  last two axes (Adafactor), ``FactoredMoment``.

Recipes (``RECIPES``; the first of each row is the default), block sizes overridable by
``block_size``:

  ====  ===============  =================================  ===================================
  bits  state_format     first moment                       second moment
  ====  ===============  =================================  ===================================
  32    None             f32                                f32
  8     'dynamic'        dynamic map, block 256, sign nudge unsigned dynamic map, block 256
  8     'e4m3'           FP8 E4M3, block 256                FP8 E4M3, block 256
  4     'factorized'     NF4 map, block 32                  factored (f32 rows + columns) at
                                                            rank >= 2, else the linear map
                                                            without 0, block 32
  4     'rank1'          NF4 map, block 128                 linear map without 0, rank-1
                                                            (block 128 below rank 2)
  4     'rank1_dynamic'  4-bit dynamic map, block 128       as 'rank1' (4-bit Adam exactly)
  ====  ===============  =================================  ===================================

Rounding (``rounding=None``: the recipe's default, ``DEFAULT_ROUNDING``): stochastic for
'factorized' and 'rank1', nearest for the others. Why the 4-bit default is not the paper's
recipe ('rank1_dynamic', nearest rounding), measured in BENCHMARKS.md ("Low-bit optimizer
states on converging fits") and tested in ``tests/optim/test_low_bit.py``:

* Nearest rounding freezes a slow EMA: with ``b2 = 0.999`` a second moment moves by at most
  0.1% of itself per step, far less than half a 4-bit step, so a stored ``nu`` can only move
  with its normalizer and drifts from the true ``nu`` as training goes on. Stochastic rounding
  is unbiased, so the stored moments follow their own gradients.
* The 4-bit dynamic map spends three of its eight positive codes below 0.08 of the block's
  absmax and holds +1 but not −1 (a block's most negative value is stored 11% closer to 0 at
  every step), so momentum is coarse where most entries are and biased toward positive
  values. NF4 (normal quantiles, both ±1 and 0) fits a block of momentum entries.
* With both fixed, the 4-bit first moment is still the largest error: its rounding noise
  relative to the block's absmax. Blocks of 32 cut it, and factoring the second moment
  (Adafactor's row and column averages, which lost nothing measurable on our fits) pays for
  their scales: 'factorized' is about 0.66 bytes per parameter against 'rank1''s 1.04.

Leaves with fewer than ``min_quantized_size`` elements keep f32 moments whatever the recipe.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxquant.numerics import formats as formats_lib
from jaxquant.optim.state import (
    QuantizedMoment,
    StateQuantizer,
    dynamic_format,
    dynamic_quantizer,
    linear_format,
)

RECIPES = {32: (None,), 8: ("dynamic", "e4m3"), 4: ("factorized", "rank1", "rank1_dynamic")}
_DEFAULT_BLOCK = {
    "dynamic": 256,
    "e4m3": 256,
    "factorized": 16,
    "rank1": 128,
    "rank1_dynamic": 128,
}
DEFAULT_ROUNDING = {
    None: "nearest",
    "dynamic": "nearest",
    "e4m3": "nearest",
    "factorized": "stochastic",
    "rank1": "stochastic",
    "rank1_dynamic": "nearest",
}
ROUNDINGS = ("nearest", "stochastic")
# Added to squared gradients of a factored moment so that an all-zero row cannot make the
# normalizing mean 0 (Adafactor's eps1).
_FACTORED_EPS = 1e-30


@struct.dataclass
class FactoredMoment:
    """A second moment of shape ``[..., m, n]`` as its f32 averages over the last axis
    (``row``, ``[..., m]``) and over the second-to-last (``col``, ``[..., n]``); it stands for
    ``row[..., :, None] · col[..., None, :] / mean(row)`` (Shazeer & Stern, "Adafactor",
    arXiv:1804.04235, Sec. 3)."""

    row: jax.Array
    col: jax.Array

    def dequantize(self) -> jax.Array:
        mean = jnp.mean(self.row, axis=-1, keepdims=True)[..., None]
        return self.row[..., :, None] * self.col[..., None, :] / jnp.where(mean > 0, mean, 1.0)


# The low-bit options that fix a state's structure: Python values, never arrays. Under
# ``optax.inject_hyperparams`` pass ``static_args=STATIC_ARGS`` when setting any of them (their
# defaults, None, need nothing).
STATIC_ARGS = ("state_bits", "state_format", "block_size", "min_quantized_size", "rounding")
DEFAULT_MIN_QUANTIZED_SIZE = 4096


def _check_static(**kw):
    for name, value in kw.items():
        if isinstance(value, (jax.Array, np.ndarray)):
            raise ValueError(
                f"{name}={value!r} arrived as an array: it fixes the optimizer state's structure "
                "and must be a Python value. Under optax.inject_hyperparams pass "
                "static_args=jaxquant.optim.STATIC_ARGS."
            )


def check_recipe(state_bits, state_format, block_size, min_quantized_size) -> str | None:
    """Validates the arguments; returns ``state_format`` with its default filled in.
    ``state_bits=None`` is 32."""
    _check_static(
        state_bits=state_bits, block_size=block_size, min_quantized_size=min_quantized_size
    )
    state_bits = 32 if state_bits is None else state_bits
    min_quantized_size = (
        DEFAULT_MIN_QUANTIZED_SIZE if min_quantized_size is None else min_quantized_size
    )
    if isinstance(state_bits, bool) or state_bits not in RECIPES:
        raise ValueError(f"state_bits={state_bits!r}: expected one of {sorted(RECIPES)}.")
    if state_format is None:
        state_format = RECIPES[state_bits][0]
    if state_format not in RECIPES[state_bits]:
        raise ValueError(
            f"state_format={state_format!r} with state_bits={state_bits}: expected one of "
            f"{RECIPES[state_bits]}."
        )
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size={block_size!r}: expected a positive int or None.")
    if (
        isinstance(min_quantized_size, bool)
        or not isinstance(min_quantized_size, int)
        or min_quantized_size < 0
    ):
        raise ValueError(f"min_quantized_size={min_quantized_size!r}: expected an int >= 0.")
    return state_format


def check_mu_dtype(mu_dtype, state_bits):
    """Validates a first moment's storage dtype (optax's ``mu_dtype``/``accumulator_dtype``):
    a float dtype, and only with ``state_bits=32`` (low-bit recipes store it themselves)."""
    if mu_dtype is None:
        return None
    try:
        dtype = jnp.dtype(mu_dtype)
    except TypeError as e:
        raise ValueError(f"mu_dtype={mu_dtype!r}: expected a float dtype or None.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"mu_dtype={mu_dtype!r}: expected a float dtype or None.")
    if state_bits not in (None, 32):
        raise ValueError(
            f"mu_dtype={mu_dtype!r} with state_bits={state_bits}: the first moment is stored "
            "by the low-bit recipe; pass mu_dtype only with state_bits=32."
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class MomentStorage:
    """Stores and loads first and second moments by a recipe (see the module docstring).

    Attributes:
      first: the first moment's quantizer, or None (f32).
      second: the second moment's quantizer, or None (f32).
      factored: factor second moments of rank >= 2 (``FactoredMoment``).
      min_quantized_size: smaller leaves keep f32 moments.
      stochastic: round stochastically (``store_*`` then need a ``key``).
    """

    first: StateQuantizer | None
    second: StateQuantizer | None
    factored: bool = False
    min_quantized_size: int = 4096
    stochastic: bool = False

    def keys(self, tree, count: jax.Array):
        """One PRNG key per leaf of ``tree`` for step ``count`` (a tree of Nones when rounding
        is nearest). Keys depend only on the step and the leaf's position, so a resumed run
        draws the same ones."""
        leaves, treedef = jax.tree.flatten(tree)
        if not self.stochastic:
            return treedef.unflatten([None] * len(leaves))
        base = jax.random.fold_in(jax.random.key(0x5EED), count)
        return treedef.unflatten([jax.random.fold_in(base, i) for i in range(len(leaves))])

    def _quantized(self, x) -> bool:
        return math.prod(x.shape) >= self.min_quantized_size

    def store_first(self, x: jax.Array, key: jax.Array | None = None):
        """f32 ``x`` as stored: f32 array or QuantizedMoment (``key``: stochastic rounding)."""
        if self.first is not None and self._quantized(x):
            return self.first.quantize(x, key)
        return x

    def store_second(self, x: jax.Array, key: jax.Array | None = None):
        """f32 ``x`` as stored (not for factored moments: see ``update_second``)."""
        if self.second is not None and self._quantized(x):
            return self.second.quantize(x, key)
        return x

    def factors(self, shape) -> bool:
        return self.factored and len(shape) >= 2 and math.prod(shape) >= self.min_quantized_size

    def init_second(self, shape):
        if self.factors(shape):
            z = jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape[:-2] + shape[-1:], jnp.float32)
            return FactoredMoment(*z)
        return self.store_second(jnp.zeros(shape, jnp.float32))

    def update_second(self, stored, g2: jax.Array, decay: float, key: jax.Array | None = None):
        """The second moment's EMA step ``decay · v + (1 − decay) · g2``.

        Returns ``(v, stored)``: the f32 moment this step's update uses and its storage. For a
        ``FactoredMoment`` the row and column averages of ``g2 + 1e-30`` take the EMA step and
        ``v`` is their rank-1 reconstruction.
        """
        if isinstance(stored, FactoredMoment):
            g2 = g2 + _FACTORED_EPS
            new = FactoredMoment(
                row=decay * stored.row + (1 - decay) * jnp.mean(g2, axis=-1),
                col=decay * stored.col + (1 - decay) * jnp.mean(g2, axis=-2),
            )
            return new.dequantize(), new
        v = decay * load(stored) + (1 - decay) * g2
        return v, self.store_second(v, key)


def load(stored) -> jax.Array:
    """The f32 value of a stored moment (f32 array, QuantizedMoment or FactoredMoment)."""
    if isinstance(stored, (QuantizedMoment, FactoredMoment)):
        return stored.dequantize()
    return stored


def moment_storage(
    state_bits: int = 32,
    state_format: str | None = None,
    *,
    block_size: int | None = None,
    min_quantized_size: int = 4096,
    rounding: str | None = None,
) -> MomentStorage:
    """The ``MomentStorage`` of a recipe (module docstring), validated with clear errors.
    ``rounding=None`` is the recipe's default (``DEFAULT_ROUNDING``)."""
    state_format = check_recipe(state_bits, state_format, block_size, min_quantized_size)
    state_bits = 32 if state_bits is None else state_bits
    if min_quantized_size is None:
        min_quantized_size = DEFAULT_MIN_QUANTIZED_SIZE
    if rounding is None:
        rounding = DEFAULT_ROUNDING[state_format]
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: expected 'nearest', 'stochastic' or None.")
    if state_bits == 32:
        return MomentStorage(None, None, False, min_quantized_size)
    b = block_size or _DEFAULT_BLOCK[state_format]
    if state_format == "dynamic":
        first, second = dynamic_quantizer(True, 8, b), dynamic_quantizer(False, 8, b)
    elif state_format == "e4m3":
        first = second = StateQuantizer(formats_lib.E4M3, b)
    else:  # 4-bit: 'rank1', 'factorized' or 'rank1_dynamic'
        first_map = dynamic_format(True, 4) if state_format == "rank1_dynamic" else formats_lib.NF4
        first = StateQuantizer(first_map, b)
        second = StateQuantizer(linear_format(False, 4), b, "rank1")
    factored = state_format == "factorized"
    return MomentStorage(first, second, factored, min_quantized_size, rounding == "stochastic")
