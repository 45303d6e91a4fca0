"""Element formats: what one quantized element can be.

Terminology:
  code:       the unsigned integer (``0 <= code < 2**bits``) stored for one element.
  value:      the real number a code stands for, before scaling (``decode(code)``).
  grid:       the set of finite values of a format.
  max_value:  the largest finite value; a symmetric scale maps a group's absmax onto it.
  min_value:  the most negative finite value (0 for unsigned formats).

Every format has at most 8 bits, so ``table()`` (value of every code) is small and decoding is a
table lookup. Rounding onto the grid is arithmetic for ``IntFormat`` and ``FloatFormat`` (cheap in
training) and a search over the sorted grid for ``LookupFormat``. Rounding saturates: values past
the ends of the grid go to ``min_value`` / ``max_value``, never to inf or NaN.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import statistics
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS = ("nearest", "stochastic")


def check_rounding(rounding: str, key: jax.Array | None) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: expected one of {ROUNDINGS}.")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...).")


def take(table, idx: jax.Array) -> jax.Array:
    """``table[idx]`` for a small constant table; the result keeps ``idx``'s sharding, also on
    meshes with explicit axes (where plain indexing cannot infer it)."""
    return jnp.asarray(table).at[idx].get(out_sharding=jax.typeof(idx).sharding)


def count_below(sorted_values, y: jax.Array, *, inclusive: bool = False) -> jax.Array:
    """int32: how many of ``sorted_values`` are ``< y`` (``<= y`` if inclusive), elementwise.

    ``jnp.searchsorted`` by a branch-free binary search of ``ceil(log2(n + 1))`` elementwise
    steps, each a ``take`` from the table, so it shards like ``y``.
    """
    v = np.asarray(sorted_values, np.float32)
    steps = max(1, math.ceil(math.log2(v.size + 1)))
    padded = np.full(2**steps, np.inf, np.float32)  # padded[i] = v[i - 1], padded[0] unused
    padded[1 : v.size + 1] = v
    pos = jnp.zeros(y.shape, jnp.int32)
    for k in reversed(range(steps)):
        cand = pos + 2**k
        below = take(padded, cand)
        pos = jnp.where(below <= y if inclusive else below < y, cand, pos)
    return pos


class Format(abc.ABC):
    """Base class of element formats (frozen dataclasses, hashable, static under jit)."""

    bits: int

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short lowercase name, e.g. ``int4``, ``e4m3fn``, ``nf4``."""

    @abc.abstractmethod
    def table(self) -> np.ndarray:
        """float64 [2**bits]: the value of every code (NaN or inf where the code is special)."""

    @abc.abstractmethod
    def round(
        self, y: jax.Array, rounding: Rounding = "nearest", key: jax.Array | None = None
    ) -> jax.Array:
        """Rounds ``y`` (already divided by its scale) onto the grid, saturating. f32 out."""

    @abc.abstractmethod
    def encode(self, v: jax.Array) -> jax.Array:
        """Codes (uint8) of values that lie on the grid (the output of ``round``)."""

    @property
    def grid(self) -> np.ndarray:
        """float64: the sorted finite values of the format, each once (-0 folded into 0)."""
        t = self.table()
        return np.unique(t[np.isfinite(t)] + 0.0)

    @property
    def max_value(self) -> float:
        return float(self.grid[-1])

    @property
    def min_value(self) -> float:
        return float(self.grid[0])

    def decode(self, codes: jax.Array) -> jax.Array:
        """f32 values of ``codes`` (any integer dtype), by table lookup."""
        return take(self.table().astype(np.float32), codes.astype(jnp.int32))

    def quantize_values(
        self, y: jax.Array, rounding: Rounding = "nearest", key: jax.Array | None = None
    ) -> jax.Array:
        """Codes (uint8) of ``y`` rounded onto the grid."""
        return self.encode(self.round(y, rounding, key))

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class IntFormat(Format):
    """Two's-complement (``signed``) or unsigned integers of ``bits`` bits, 2 <= bits <= 8.

    Signed grid: ``-2**(bits-1) .. 2**(bits-1)-1``; ``max_value = 2**(bits-1) - 1``, so a symmetric
    absmax scale never uses the most negative code (it is there for clipped calibrations).
    Unsigned grid: ``0 .. 2**bits - 1``, used with a zero point. Codes: the value's low ``bits``
    bits (two's complement for signed).
    """

    bits: int
    signed: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntFormat bits={self.bits!r}: expected an integer from 2 to 8.")

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def _lo(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def _hi(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def table(self) -> np.ndarray:
        codes = np.arange(2**self.bits)
        if self.signed:
            codes = np.where(codes >= 2 ** (self.bits - 1), codes - 2**self.bits, codes)
        return codes.astype(np.float64)

    @property
    def grid(self) -> np.ndarray:
        return np.arange(self._lo, self._hi + 1, dtype=np.float64)

    def round(self, y, rounding="nearest", key=None):
        check_rounding(rounding, key)
        y = jnp.asarray(y, jnp.float32)
        if rounding == "nearest":
            q = jnp.round(y)  # round half to even
        else:
            q = jnp.floor(y + jax.random.uniform(key, y.shape, jnp.float32))
        return jnp.clip(q, self._lo, self._hi)

    def encode(self, v):
        return (v.astype(jnp.int32) & (2**self.bits - 1)).astype(jnp.uint8)


SpecialValues = Literal["ieee", "fn", "none"]


@dataclasses.dataclass(frozen=True)
class FloatFormat(Format):
    """A sign-exponent-mantissa minifloat: 1 sign bit, ``exponent_bits``, ``mantissa_bits``.

    ``special`` says which codes are not finite numbers:
      * ``'ieee'``: the all-ones exponent holds inf and NaN (E5M2);
      * ``'fn'``:   only S.1111.111 is NaN, no inf (E4M3FN);
      * ``'none'``: every code is a number (the OCP MX FP6/FP4 types E3M2, E2M3, E2M1).
    Values: exponent field 0 is subnormal, ``(m / 2**M) * 2**(1 - bias)``; otherwise
    ``(1 + m / 2**M) * 2**(e - bias)``. Rounding is to nearest, ties to even, saturating at
    ``max_value`` (bit-exact with ``ml_dtypes`` on the finite range).
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = dataclasses.field(default=None, kw_only=True)
    special: SpecialValues = dataclasses.field(default="none", kw_only=True)

    def __post_init__(self):
        e, m = self.exponent_bits, self.mantissa_bits
        if not (isinstance(e, int) and isinstance(m, int)) or e < 1 or m < 0 or 1 + e + m > 8:
            raise ValueError(
                f"FloatFormat(exponent_bits={e!r}, mantissa_bits={m!r}): expected integers with "
                "exponent_bits >= 1, mantissa_bits >= 0 and 1 + E + M <= 8 bits."
            )
        if self.special not in ("ieee", "fn", "none"):
            raise ValueError(
                f"FloatFormat special={self.special!r}: expected 'ieee', 'fn' or 'none'."
            )
        if self.special == "ieee" and e < 2:
            raise ValueError("FloatFormat special='ieee' needs exponent_bits >= 2.")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (e - 1) - 1)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def name(self) -> str:
        suffix = {"ieee": "", "fn": "fn", "none": ""}[self.special]
        return f"e{self.exponent_bits}m{self.mantissa_bits}{suffix}"

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (subnormals share its step)."""
        return 1 - self.bias

    def table(self) -> np.ndarray:
        e_bits, m_bits = self.exponent_bits, self.mantissa_bits
        codes = np.arange(2**self.bits)
        sign = np.where(codes >> (e_bits + m_bits) & 1, -1.0, 1.0)
        exp = (codes >> m_bits) & (2**e_bits - 1)
        man = (codes & (2**m_bits - 1)).astype(np.float64)
        mag = np.where(
            exp == 0,
            man / 2**m_bits * 2.0 ** (1 - self.bias),
            (1 + man / 2**m_bits) * np.exp2(exp.astype(np.float64) - self.bias),
        )
        values = sign * mag
        top = exp == 2**e_bits - 1
        if self.special == "ieee":
            values = np.where(top & (man == 0), sign * np.inf, values)
            values = np.where(top & (man != 0), np.nan, values)
        elif self.special == "fn":
            values = np.where(top & (man == 2**m_bits - 1), np.nan, values)
        return values

    def round(self, y, rounding="nearest", key=None):
        check_rounding(rounding, key)
        y = jnp.asarray(y, jnp.float32)
        a = jnp.minimum(jnp.abs(y), self.max_value)
        # frexp is exact where log2 is not: a = f * 2**e with f in [0.5, 1).
        _, e = jnp.frexp(a)
        e = jnp.maximum(e - 1, self.min_exponent)  # subnormals share the smallest normal step
        step = jnp.ldexp(jnp.ones_like(a), e - self.mantissa_bits)
        if rounding == "nearest":
            q = jnp.round(a / step) * step  # half to even on the mantissa
        else:
            u = jax.random.uniform(key, y.shape, jnp.float32)
            q = jnp.floor(a / step + u) * step
        q = jnp.minimum(q, self.max_value)
        return jnp.where(jnp.signbit(y), -q, q)

    def encode(self, v):
        a = jnp.abs(v).astype(jnp.float32)
        _, e = jnp.frexp(a)
        e = jnp.maximum(e - 1, self.min_exponent)
        normal = a >= 2.0**self.min_exponent
        exp_field = jnp.where(normal, e + self.bias, 0)
        frac = a / jnp.ldexp(jnp.ones_like(a), e)  # in [1, 2) for normals, [0, 1) below
        man = jnp.where(normal, frac - 1.0, frac) * 2**self.mantissa_bits
        code = (
            (jnp.signbit(v).astype(jnp.int32) << (self.exponent_bits + self.mantissa_bits))
            | (exp_field.astype(jnp.int32) << self.mantissa_bits)
            | jnp.round(man).astype(jnp.int32)
        )
        return code.astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class LookupFormat(Format):
    """A codebook of scalar values: code ``i`` stands for ``values[i]``.

    ``values`` are sorted, distinct and finite, at most 256 of them; ``bits`` is
    ``ceil(log2(len(values)))``. Covers NF4 (``LookupFormat.normal_float(4)`` gives the exact
    QLoRA table), codebooks fitted to data (``LookupFormat.from_quantiles``) and any hand-made
    grid. Rounding is to the nearest value (ties go to the lower code), or stochastic between the
    two neighbours with probabilities that make it unbiased.
    """

    values: tuple[float, ...]
    label: str = ""

    def __post_init__(self):
        vals = tuple(float(v) for v in np.asarray(self.values, np.float64).ravel())
        arr = np.asarray(vals)
        if not 2 <= len(vals) <= 256:
            raise ValueError(f"LookupFormat values: expected 2 to 256 values, got {len(vals)}.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"LookupFormat values must be finite, got {vals}.")
        if not np.all(np.diff(arr) > 0):
            raise ValueError(f"LookupFormat values must be sorted and distinct, got {vals}.")
        object.__setattr__(self, "values", vals)

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.values))))

    @property
    def name(self) -> str:
        return self.label or f"lookup{len(self.values)}"

    def table(self) -> np.ndarray:
        t = np.full(2**self.bits, np.nan)
        t[: len(self.values)] = self.values
        return t

    def round(self, y, rounding="nearest", key=None):
        return self.decode(self.quantize_values(y, rounding, key))

    def quantize_values(self, y, rounding="nearest", key=None):
        check_rounding(rounding, key)
        y = jnp.asarray(y, jnp.float32)
        vals = np.asarray(self.values)
        if rounding == "nearest":
            return count_below((vals[1:] + vals[:-1]) / 2, y).astype(jnp.uint8)
        table = vals.astype(np.float32)
        yc = jnp.clip(y, vals[0], vals[-1])
        lo = jnp.clip(count_below(table, yc, inclusive=True) - 1, 0, len(vals) - 2)
        p_up = (yc - take(table, lo)) / take(np.diff(table), lo)
        up = jax.random.uniform(key, y.shape, jnp.float32) < p_up
        return (lo + up).astype(jnp.uint8)

    def encode(self, v):
        return self.quantize_values(v)

    @classmethod
    def normal_float(cls, bits: int = 4, offset: float | None = None) -> LookupFormat:
        """NF-k: quantiles of N(0, 1), asymmetric so that 0 is exact, normalized to [-1, 1].

        ``2**(bits-1)`` positive values at the quantiles ``linspace(offset, 1/2, 2**(bits-1)+1)``
        (the last dropped), ``2**(bits-1) - 1`` negative ones likewise, and 0; the default offset
        for 4 bits is QLoRA's 0.9677 (the mean of the 1/32 and 1/30 quantile rules).

        References: Dettmers et al., "QLoRA", arXiv:2305.14314, Sec. 3 and Appendix E.
        """
        if not 2 <= bits <= 8:
            raise ValueError(f"normal_float bits={bits}: expected 2 to 8.")
        if offset is None:
            offset = 0.5 * (1 - 1 / (2 * 2**bits) + 1 - 1 / (2 * (2**bits - 1)))
            if bits == 4:
                offset = 0.9677083
        ppf = statistics.NormalDist().inv_cdf
        half = 2 ** (bits - 1)
        pos = [ppf(p) for p in np.linspace(offset, 0.5, half + 1)[:-1]]
        neg = [-ppf(p) for p in np.linspace(offset, 0.5, half)[:-1]]
        v = np.sort(np.array(pos + neg + [0.0]))
        return cls(v / np.abs(v).max(), label=f"nf{bits}")

    @classmethod
    def from_quantiles(cls, x, bits: int, label: str = "") -> LookupFormat:
        """A codebook at the quantiles ``(i + 1/2) / 2**bits`` of the data ``x``, scaled so that
        its largest magnitude is 1 (so an absmax scale maps onto it).

        Equal quantiles (data with ties) are merged, which can leave fewer than ``2**bits``
        values; fewer than 2 distinct values is an error.
        """
        x = np.asarray(x, np.float64).ravel()
        if x.size == 0 or not np.all(np.isfinite(x)):
            raise ValueError("from_quantiles x: expected a non-empty array of finite values.")
        if not 1 <= bits <= 8:
            raise ValueError(f"from_quantiles bits={bits}: expected 1 to 8.")
        q = np.unique(np.quantile(x, (np.arange(2**bits) + 0.5) / 2**bits))
        if q.size < 2 or np.abs(q).max() == 0:
            raise ValueError("from_quantiles x: the data has fewer than 2 distinct quantiles.")
        return cls(q / np.abs(q).max(), label=label or f"quantile{bits}")


# The 16 NF4 values exactly as QLoRA / bitsandbytes publish them.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982985687256,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

INT2 = IntFormat(2)
INT3 = IntFormat(3)
INT4 = IntFormat(4)
INT8 = IntFormat(8)
UINT4 = IntFormat(4, signed=False)
UINT8 = IntFormat(8, signed=False)
E4M3 = FloatFormat(4, 3, special="fn")
E5M2 = FloatFormat(5, 2, special="ieee")
E3M2 = FloatFormat(3, 2)
E2M3 = FloatFormat(2, 3)
E2M1 = FloatFormat(2, 1)
NF4 = LookupFormat(NF4_VALUES, label="nf4")
