"""Fully quantized training: a matmul whose three products each quantize both their operands.

QAT (``fake_quant``) quantizes the forward pass only; its backward is float. A
``TrainingRecipe`` also quantizes the two backward products, as FP8 training, Quartet (MXFP4)
and NVIDIA's NVFP4 recipe do. ``train_matmul(x, w, recipe)`` is the matmul with that custom VJP;
layers call it when a ``QuantRule`` names a recipe (``QuantRule('.*', train='nvfp4')``).

Terminology (``y = x @ w``, ``x`` [M, K], ``w`` [K, N], ``g = dL/dy`` [M, N]):
  product:        ``forward``      ``y  = x  @ w``   contracts K;
                  ``grad_input``   ``dx = g  @ wᵀ``  contracts N;
                  ``grad_weight``  ``dw = xᵀ @ g``   contracts M (the tokens).
  operand quantizer (``OperandQuant``): how one operand of one product is quantized. Its scales
                  are shared along that product's contraction axis: ``'tensor'`` (one scale),
                  ``'channel'`` (one per row of the operand, over the whole contraction),
                  ``'block'`` (one per ``block`` consecutive contracted elements) or ``'tile'``
                  (one per ``block × block`` square, the same along either axis: NVFP4's
                  weights, so the forward and the input gradient read one quantized weight).
  rotation:       a blockwise Hadamard transform (``pallas_kernels.hadamard``) along a product's
                  contraction axis, applied to both operands, so it cancels in exact
                  arithmetic and spreads outliers before quantizing. The forward's is fixed
                  (Quartet's Hadamard); it is undone on the gradients (``dx``, ``dw``), after
                  the trust mask. A backward product's may carry random signs drawn per call
                  from the key (``random_signs``), applied before the transform (H·D).
  clip:           ``'absmax'`` (the block's largest magnitude maps onto the grid's end) or
                  ``'quest'`` (QuEST: the scale is ``QUEST_GAUSSIAN_CLIP`` standard deviations
                  of the block over the grid's end, RMSE-optimal for Gaussian data; elements
                  beyond it clip, and the trust mask zeroes their gradient).
  prescale:       quantize ``prescale · x`` and divide the result by it: Quartet's backward
                  quantizes ¾ of the value on an E8M0 scale (so nothing saturates) and the
                  product is rescaled by (4/3)² = 16/9.
  delayed scaling: a per-tensor scale from the largest amax of the previous steps (an amax
                  history, newest first), as Transformer Engine's FP8 recipe. The histories
                  are inputs of ``train_matmul`` whose "gradients" are the updated histories
                  (Flax's ``'_overwrite_with_gradient'`` convention): a trainer replaces them
                  with their gradient rather than stepping. A history of zeros (the first step)
                  falls back to the current amax. One history per ``train_matmul`` call: a
                  weight applied twice in one step would receive the sum of two rolled
                  histories (the trainer takes the max over microbatches, not over calls).
  source:         what the backward products read for ``x`` and ``w``: ``'float'`` (the
                  operand, after the forward rotation) or ``'forward'`` (the forward's
                  dequantized operand; with no backward quantizer it is used as is).

Emulation: every product is computed on dequantized values in f32 (``'emulated'``), on any
backend. ``'native'`` computes products of FP8 operands with per-tensor or per-row scales
as an FP8 ``dot_general`` (scales applied to the f32 result) and block-scaled FP8/FP4 operands
with ``jax.nn.scaled_matmul`` (cuDNN's MXFP8/NVFP4 GEMMs on Blackwell); ``None`` picks native
FP8 on NVIDIA GPUs, native block-scaled products on Blackwell, and emulated elsewhere. The
emulated path is the native one's reference.

References:
  Castro et al., "Quartet: Native FP4 Training Can Be Optimal for Large Language Models",
  arXiv:2505.14669 (and the paper's code, IST-DASLab/Quartet).
  NVIDIA, "Pretraining Large Language Models with NVFP4", arXiv:2509.25149.
  Micikevicius et al., "FP8 Formats for Deep Learning", arXiv:2209.05433.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.numerics import formats as F
from jaxquant.numerics import scaling as scaling_lib
from pallas_kernels.hadamard import hadamard

GRANULARITIES = ("tensor", "channel", "block", "tile")
CLIPS = ("absmax", "quest")
SOURCES = ("float", "forward")
IMPLEMENTATIONS = ("emulated", "native")
PRODUCTS = ("forward", "grad_input", "grad_weight")
# QuEST's clip for a Gaussian block on the E2M1 grid, in standard deviations: the constant of
# the Quartet code (``gaussian_scale = 2.92247856 / 6.0`` times the block's std is the scale).
QUEST_GAUSSIAN_CLIP = 2.92247856
# The collection a trainer overwrites with the "gradient" (Flax's fp8_ops convention).
OVERWRITE_COLLECTION = "_overwrite_with_gradient"
# The PRNG stream layers draw a recipe's key from (stochastic rounding, random signs).
RNG_STREAM = "train_recipe"

_NATIVE_DTYPES = {"e4m3fn": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2, "e2m1": jnp.float4_e2m1fn}
_NATIVE_SCALES = {"e8m0": jnp.float8_e8m0fnu, "e4m3": jnp.float8_e4m3fn}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperandQuant:
    """How one operand of one product is quantized (module docstring). Frozen, hashable.

    Attributes:
      format: the element format (``E4M3``, ``E5M2``, ``E2M1``, ...).
      granularity: ``'tensor'``, ``'channel'``, ``'block'`` or ``'tile'``.
      block: elements per scale along the contraction axis (``'block'``), or the tile's side.
      scale_dtype: ``'float32'``, ``'e8m0'`` (OCP MX rule) or ``'e4m3'`` (with
        ``tensor_scale``: NVFP4).
      tensor_scale: a second-level f32 scale for the whole operand.
      clip: ``'absmax'`` or ``'quest'`` (module docstring; block or tile granularity).
      quest_scale: how QuEST's scale becomes a power of two with ``scale_dtype='e8m0'``:
        ``'nearest'`` (in log2; it reproduces the paper's Table 2) or ``'floor'`` (the paper
        code's kernel, which clips harder: BENCHMARKS.md measures both).
      prescale: quantize ``prescale · x`` (0 < prescale <= 1) and divide by it afterwards.
      rounding: ``'nearest'`` or ``'stochastic'`` (unbiased; draws from the recipe's key).
      scale_rounding: how an absmax block scale is rounded to ``scale_dtype``: ``'nearest'``
        (OCP's floor rule for E8M0) or ``'up'`` (the next representable scale at or above
        ``amax / max``, so no element saturates: stochastic rounding stays unbiased at each
        block's largest element, which a rounded-down scale clips).
      delayed: a per-tensor scale from an amax history of ``history`` steps.
      history: the amax history's length (``delayed`` only).
    """

    format: F.Format
    granularity: str = "tensor"
    block: int | None = None
    scale_dtype: str = "float32"
    tensor_scale: bool = False
    clip: str = "absmax"
    quest_scale: str = "nearest"
    prescale: float = 1.0
    rounding: str = "nearest"
    scale_rounding: str = "nearest"
    delayed: bool = False
    history: int = 16

    def __post_init__(self):
        if not isinstance(self.format, F.Format):
            raise TypeError(f"OperandQuant format={self.format!r}: expected an element Format.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"OperandQuant granularity={self.granularity!r}: expected one of {GRANULARITIES}."
            )
        blocked = self.granularity in ("block", "tile")
        if blocked != (self.block is not None):
            raise ValueError(
                f"OperandQuant granularity={self.granularity!r} with block={self.block!r}: "
                "'block' and 'tile' need a block size, 'tensor' and 'channel' take none."
            )
        if blocked and (isinstance(self.block, bool) or not isinstance(self.block, int)):
            raise ValueError(f"OperandQuant block={self.block!r}: expected a positive int.")
        if blocked and self.block < 1:
            raise ValueError(f"OperandQuant block={self.block}: expected >= 1.")
        # the scale dtype and tensor scale follow Scaling's rules (e4m3 needs a tensor scale)
        scaling_lib.Scaling(
            axis=0, scale_dtype=self.scale_dtype, tensor_scale=self.tensor_scale
        ).check_format(self.format)
        if self.clip not in CLIPS:
            raise ValueError(f"OperandQuant clip={self.clip!r}: expected one of {CLIPS}.")
        if self.clip == "quest" and (self.tensor_scale or not blocked):
            raise ValueError(
                "OperandQuant clip='quest' scales each block by its standard deviation: it needs "
                "'block' or 'tile' granularity and no tensor scale."
            )
        if self.quest_scale not in ("nearest", "floor"):
            raise ValueError(
                f"OperandQuant quest_scale={self.quest_scale!r}: expected 'nearest' or 'floor'."
            )
        if not 0 < self.prescale <= 1:
            raise ValueError(f"OperandQuant prescale={self.prescale!r}: expected 0 < p <= 1.")
        if self.rounding not in F.ROUNDINGS:
            raise ValueError(
                f"OperandQuant rounding={self.rounding!r}: expected one of {F.ROUNDINGS}."
            )
        if self.scale_rounding not in ("nearest", "up"):
            raise ValueError(
                f"OperandQuant scale_rounding={self.scale_rounding!r}: expected 'nearest' or 'up'."
            )
        if (
            self.rounding == "stochastic"
            and self.scale_dtype == "e8m0"
            and self.clip == "absmax"
            and self.prescale > 0.75
            and self.scale_rounding == "nearest"
        ):
            raise ValueError(
                "OperandQuant: stochastic rounding on E8M0 scales (OCP rule: a block's amax lands "
                "in [4, 8) on a grid ending at 6) clips and so biases up to a quarter of the "
                "range; pass prescale=0.75 (Quartet) or scale_rounding='up'."
            )
        if self.delayed and (
            self.granularity != "tensor" or self.clip != "absmax" or self.scale_dtype != "float32"
        ):
            raise ValueError(
                "OperandQuant delayed=True keeps one amax history per tensor: it needs "
                "granularity='tensor', clip='absmax' and scale_dtype='float32'."
            )
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"OperandQuant history={self.history!r}: expected an int >= 1.")

    @property
    def needs_key(self) -> bool:
        return self.rounding == "stochastic"

    def block_shape(self, shape: tuple[int, int], axis: int) -> tuple[int, int]:
        """Each scale's block over a 2-D operand ``shape`` contracted along ``axis``."""
        if self.granularity == "tensor":
            return tuple(shape)
        if self.granularity == "tile":
            return (self.block, self.block)
        along = shape[axis] if self.granularity == "channel" else self.block
        return (along, 1) if axis == 0 else (1, along)

    def describe(self) -> str:
        parts = [self.format.name, self.granularity + (f"{self.block}" if self.block else "")]
        if self.scale_dtype != "float32":
            parts.append(f"s{self.scale_dtype}")
        if self.tensor_scale:
            parts.append("ts")
        if self.clip == "quest":
            parts.append("quest" + ("_floor" if self.quest_scale == "floor" else ""))
        if self.prescale != 1:
            parts.append(f"x{self.prescale:g}")
        if self.rounding == "stochastic":
            parts.append("sr")
        if self.scale_rounding == "up":
            parts.append("sup")
        if self.delayed:
            parts.append(f"delayed{self.history}")
        return "_".join(parts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProductRecipe:
    """How one of the three products quantizes its operands.

    Attributes:
      lhs, rhs: the operands' quantizers (None: the operand as is). For ``forward`` they are
        ``x`` and ``w``; for ``grad_input`` ``g`` and ``w``; for ``grad_weight`` ``x`` and ``g``.
      rotation: the Hadamard block along the contraction axis (a power of two), or None.
      random_signs: multiply the rotation by random ±1 signs drawn per call (backward only).
    """

    lhs: OperandQuant | None = None
    rhs: OperandQuant | None = None
    rotation: int | None = None
    random_signs: bool = False

    def __post_init__(self):
        for name in ("lhs", "rhs"):
            q = getattr(self, name)
            if q is not None and not isinstance(q, OperandQuant):
                raise TypeError(f"ProductRecipe {name}={q!r}: expected an OperandQuant or None.")
        if self.rotation is not None:
            r = self.rotation
            if isinstance(r, bool) or not isinstance(r, int) or r < 1 or r & (r - 1):
                raise ValueError(f"ProductRecipe rotation={r!r}: expected a power of two.")
        if self.random_signs and self.rotation is None:
            raise ValueError("ProductRecipe random_signs=True needs a rotation block.")

    @property
    def needs_key(self) -> bool:
        return self.random_signs or any(q is not None and q.needs_key for q in (self.lhs, self.rhs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingRecipe:
    """The three products of a linear layer's training step, each quantized its own way.

    Attributes:
      name: the registry name (``get_training_recipe``).
      forward, grad_input, grad_weight: the products (module docstring).
      x_source, w_source: what ``grad_weight`` reads for ``x`` and ``grad_input`` for ``w``:
        ``'float'`` or ``'forward'`` (module docstring).
      implementation: ``'emulated'``, ``'native'`` or None: native FP8 products on NVIDIA
        GPUs, native block-scaled ones where cuDNN has them (Blackwell), emulated elsewhere.
        Native applies to products whose two operands are quantized to FP8 or FP4 (every
        product of the built-in recipes); a product with a float operand, or another format,
        is computed emulated under any setting.
    """

    name: str
    forward: ProductRecipe = ProductRecipe()
    grad_input: ProductRecipe = ProductRecipe()
    grad_weight: ProductRecipe = ProductRecipe()
    x_source: str = "float"
    w_source: str = "float"
    implementation: str | None = None

    def __post_init__(self):
        for p in PRODUCTS:
            if not isinstance(getattr(self, p), ProductRecipe):
                raise TypeError(f"TrainingRecipe {p}: expected a ProductRecipe.")
        if self.forward.random_signs:
            raise ValueError(
                "TrainingRecipe forward.random_signs: the forward's rotation is fixed (it is "
                "undone on the gradients); random signs are a backward option."
            )
        for name in ("x_source", "w_source"):
            if getattr(self, name) not in SOURCES:
                raise ValueError(
                    f"TrainingRecipe {name}={getattr(self, name)!r}: expected one of {SOURCES}."
                )
        if self.implementation not in (None, *IMPLEMENTATIONS):
            raise ValueError(
                f"TrainingRecipe implementation={self.implementation!r}: expected None or one "
                f"of {IMPLEMENTATIONS}."
            )

    @property
    def needs_key(self) -> bool:
        return any(getattr(self, p).needs_key for p in PRODUCTS)

    def history_names(self) -> tuple[str, ...]:
        """The amax histories of delayed operands: ``'<product>_<lhs|rhs>'``."""
        out = []
        for p in PRODUCTS:
            for side in ("lhs", "rhs"):
                q = getattr(getattr(self, p), side)
                if q is not None and q.delayed:
                    out.append(f"{p}_{side}")
        return tuple(out)

    def init_histories(self) -> dict[str, jax.Array]:
        """Zero amax histories, one f32 [history] per delayed operand (``history_names``)."""
        out = {}
        for name in self.history_names():
            p, side = name.rsplit("_", 1)
            q = getattr(getattr(self, p), side)
            out[name] = jnp.zeros((q.history,), jnp.float32)
        return out

    def with_implementation(self, implementation: str | None) -> TrainingRecipe:
        return dataclasses.replace(self, implementation=implementation)

    def describe(self) -> str:
        """One line per product: its operands' quantizers and rotation."""
        lines = [f"{self.name}:"]
        for p in PRODUCTS:
            r = getattr(self, p)
            rot = ""
            if r.rotation:
                rot = f", hadamard{r.rotation}" + (" random signs" if r.random_signs else "")
            lhs = r.lhs.describe() if r.lhs else "float"
            rhs = r.rhs.describe() if r.rhs else "float"
            lines.append(f"  {p}: {lhs} x {rhs}{rot}")
        lines.append(f"  backward reads x: {self.x_source}, w: {self.w_source}")
        return "\n".join(lines)


# -- operand quantization ---------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("values", "block_scale", "tensor_scale", "mask", "amax"),
    meta_fields=("shape", "prescale"),
)
@dataclasses.dataclass(frozen=True)
class QuantizedOperand:
    """An operand on its grid: ``values · block_scale · tensor_scale / prescale``.

    ``values`` and ``block_scale`` are in the block view ``[d0 / b0, b0, d1 / b1, b1]`` (the
    scale with 1 on the block axes); ``mask`` (QuEST's trust mask, or None) like ``values``;
    ``amax`` the operand's largest magnitude (f32 []).
    """

    values: jax.Array
    block_scale: jax.Array
    tensor_scale: jax.Array | None
    mask: jax.Array | None
    amax: jax.Array
    shape: tuple[int, int]
    prescale: float

    def dequantize(self) -> jax.Array:
        s = self.block_scale if self.tensor_scale is None else self.block_scale * self.tensor_scale
        out = self.values * s
        if self.prescale != 1:
            out = out * np.float32(1 / self.prescale)
        return out.reshape(self.shape)

    def mask_2d(self) -> jax.Array | None:
        return None if self.mask is None else self.mask.reshape(self.shape)


def _block_view(x: jax.Array, block: tuple[int, int], what: str) -> jax.Array:
    d0, d1 = x.shape
    b0, b1 = block
    if d0 % b0 or d1 % b1:
        raise ValueError(
            f"{what}: blocks of {b0}x{b1} do not divide the operand of shape {tuple(x.shape)}."
        )
    return x.reshape(d0 // b0, b0, d1 // b1, b1)


def _pow2(v: jax.Array, how: str) -> jax.Array:
    """``v > 0`` as a power of two: ``floor`` or ``nearest`` in log2 (exact, via frexp)."""
    m, e = jnp.frexp(v)  # v = m · 2**e, m in [0.5, 1)
    e = e - 1  # floor(log2 v)
    if how == "nearest":
        e = e + (m * 2 >= np.float32(math.sqrt(2))).astype(e.dtype)
    return jnp.ldexp(jnp.ones_like(v), e)


def quantize_operand(
    x: jax.Array,
    q: OperandQuant,
    axis: int,
    *,
    key: jax.Array | None = None,
    history: jax.Array | None = None,
    what: str = "operand",
) -> QuantizedOperand:
    """Quantizes a 2-D f32 operand contracted along ``axis`` (0 or 1) per ``q``.

    Args:
      x: f32 [d0, d1].
      q: the operand quantizer.
      axis: the product's contraction axis of ``x``.
      key: PRNG key for stochastic rounding.
      history: the amax history for ``q.delayed`` (f32 [q.history]).
      what: names the operand in errors.
    """
    fmt = q.format
    xv = _block_view(x.astype(jnp.float32), q.block_shape(x.shape, axis), what)
    amax = jnp.max(jnp.abs(xv), axis=(1, 3), keepdims=True)
    current = jnp.max(amax)
    t = None
    if q.clip == "quest":
        mean = jnp.mean(xv, axis=(1, 3), keepdims=True)
        var = jnp.mean(xv * xv, axis=(1, 3), keepdims=True) - mean * mean
        c = (
            QUEST_GAUSSIAN_CLIP
            * jnp.sqrt(jnp.maximum(var, 0.0))
            * scaling_lib.reciprocal(fmt.max_value)
        )
        s = jnp.where(c > 0, c, 1.0)
        if q.scale_dtype == "e8m0":
            s = _pow2(s, q.quest_scale)
        elif q.scale_dtype == "bfloat16":
            s = s.astype(jnp.bfloat16).astype(jnp.float32)
    else:
        extent = amax
        if q.delayed:
            if history is None:
                raise ValueError(f"{what}: a delayed-scaling operand needs its amax history.")
            past = jnp.max(history)
            extent = jnp.where(past > 0, past, current) * jnp.ones_like(amax)
        scaling = scaling_lib.Scaling(
            axis=0, scale_dtype=q.scale_dtype, tensor_scale=q.tensor_scale
        )
        stored = scaling_lib.scales_from_range(-extent, extent, fmt, scaling)
        s = scaling_lib.decode_scale(stored.scale, scaling)
        t = stored.tensor_scale
        if q.scale_rounding == "up":
            need = extent * scaling_lib.reciprocal(fmt.max_value)
            if t is not None:
                need = need / t
            s = jnp.where(s < need, _next_scale(s, q.scale_dtype), s)
    full = s if t is None else s * t
    y = xv / full
    if q.prescale != 1:
        y = y * np.float32(q.prescale)
    values = fmt.round(y, q.rounding, key)
    mask = (jnp.abs(y) < fmt.max_value) if q.clip == "quest" else None
    return QuantizedOperand(values, s, t, mask, current, tuple(x.shape), q.prescale)


def gaussian_mse(q: OperandQuant, *, n_scales: int = 64, rows: int = 16384, seed: int = 0) -> float:
    """MSE / sigma² of ``q`` on Gaussian rows of 32 (quantized along them), averaged over
    log2(sigma) uniform in [0, 1) at ``n_scales`` points: E8M0 scales make the error periodic
    in log2 sigma (Quartet's Table 2 measures MXFP4 quantizers this way)."""
    x = jax.random.normal(jax.random.key(seed), (rows, 32), jnp.float32)
    f = jax.jit(lambda x, key: quantize_operand(x, q, 1, key=key).dequantize())
    out = []
    for i, u in enumerate(np.arange(n_scales) / n_scales):
        y = x * np.float32(2.0**u)
        out.append(float(jnp.mean((f(y, jax.random.key(i)) - y) ** 2)) / 4.0**u)
    return float(np.mean(out))


def _next_scale(s: jax.Array, scale_dtype: str) -> jax.Array:
    """The next representable scale above ``s`` (> 0, on the ``scale_dtype`` grid)."""
    if scale_dtype == "float32":
        return jnp.nextafter(s, np.float32(np.inf))
    if scale_dtype == "e8m0":
        return s * 2
    _, e = jnp.frexp(s)  # s = m · 2**e, m in [0.5, 1): floor(log2 s) = e - 1
    mantissa, min_exponent = (3, -6) if scale_dtype == "e4m3" else (7, -126)
    return s + jnp.ldexp(jnp.ones_like(s), jnp.maximum(e - 1, min_exponent) - mantissa)


def rotate(x: jax.Array, axis: int, block: int, signs: jax.Array | None = None) -> jax.Array:
    """``x`` (2-D) with ``signs`` (±1 [block], the same for every block) and then a blockwise
    orthonormal Hadamard along ``axis``: the transform a product applies to both operands."""
    if x.shape[axis] % block:
        raise ValueError(
            f"rotation: a Hadamard block of {block} does not divide axis {axis} of the operand "
            f"of shape {tuple(x.shape)}."
        )
    v = (x if axis == 1 else x.T).astype(jnp.float32)
    if signs is not None:
        # signs before the transform (the randomized Hadamard transform H·D): after it they
        # would only flip the signs of whole blocks' elements, which a blockwise absmax
        # quantizer commutes with (Q(vHD) = Q(vH)D), leaving the product unchanged
        v = (v.reshape(v.shape[0], -1, block) * signs).reshape(v.shape)
    v = hadamard(v, block)
    return v if axis == 1 else v.T


def unrotate(x: jax.Array, axis: int, block: int) -> jax.Array:
    """The inverse of ``rotate`` without signs (the normalized Hadamard is its own inverse)."""
    return rotate(x, axis, block)


def _random_signs(key: jax.Array, block: int) -> jax.Array:
    return jnp.where(jax.random.bernoulli(key, 0.5, (block,)), 1.0, -1.0).astype(jnp.float32)


# -- products ---------------------------------------------------------------------------------


def _native_ok(q: OperandQuant | None) -> bool:
    return (
        q is not None
        and q.format.name in _NATIVE_DTYPES
        and (
            (q.granularity in ("tensor", "channel") and q.scale_dtype == "float32")
            or (q.granularity in ("block", "tile") and q.scale_dtype in _NATIVE_SCALES)
        )
    )


def _contract_last(op: QuantizedOperand, axis: int, block: int):
    """(values [rows, K], scales [rows, K / block]) with the contraction axis last: one scale
    per ``block`` contracted elements (a tile's scale repeats across its rows)."""
    v = op.values.reshape(op.shape)
    s = jnp.broadcast_to(op.block_scale, op.values.shape).reshape(op.shape)
    if axis == 0:
        v, s = v.T, s.T
    return v, s.reshape(v.shape[0], v.shape[1] // block, block)[:, :, 0]


def _product_native(lq, lop, la, rq, rop, ra) -> jax.Array:
    """``lhs`` contracted with ``rhs`` along their axes ``la``/``ra`` on native low-precision
    types: [rows_l, rows_r]."""
    if lq.granularity in ("tensor", "channel") and rq.granularity in ("tensor", "channel"):
        lv, ls = _contract_last(lop, la, lop.shape[la])
        rv, rs = _contract_last(rop, ra, rop.shape[ra])
        y = lax.dot_general(
            lv.astype(_NATIVE_DTYPES[lq.format.name]),
            rv.astype(_NATIVE_DTYPES[rq.format.name]),
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        y = y * ls * rs.T
    else:

        def block_len(q, op, a):
            if q.granularity in ("block", "tile"):
                return q.block
            return op.shape[a]

        b = min(block_len(lq, lop, la), block_len(rq, rop, ra))
        lv, ls = _contract_last(lop, la, b)
        rv, rs = _contract_last(rop, ra, b)
        y = jax.nn.scaled_matmul(
            lv.astype(_NATIVE_DTYPES[lq.format.name])[None],
            rv.astype(_NATIVE_DTYPES[rq.format.name])[None],
            ls.astype(_NATIVE_SCALES.get(lq.scale_dtype, jnp.float32))[None],
            rs.astype(_NATIVE_SCALES.get(rq.scale_dtype, jnp.float32))[None],
            preferred_element_type=jnp.float32,
        )[0]
    for op in (lop, rop):
        if op.tensor_scale is not None:
            y = y * op.tensor_scale
        if op.prescale != 1:
            y = y * np.float32(1 / op.prescale)
    return y


def _product(recipe_q, ops, axes, implementation) -> jax.Array:
    """The product of two operands (each a ``QuantizedOperand`` or a float array) along
    their contraction axes: ``[rows of lhs, rows of rhs]``."""
    (lq, rq), (lop, rop), (la, ra) = recipe_q, ops, axes
    if implementation != "emulated" and _native_ok(lq) and _native_ok(rq):
        block_scaled = any(q.granularity in ("block", "tile") for q in (lq, rq))
        if implementation == "native" or _native_by_default(block_scaled):
            return _product_native(lq, lop, la, rq, rop, ra)
    lhs = lop.dequantize() if isinstance(lop, QuantizedOperand) else lop
    rhs = rop.dequantize() if isinstance(rop, QuantizedOperand) else rop
    return lax.dot_general(
        lhs,
        rhs,
        (((la,), (ra,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _pick_implementation(recipe: TrainingRecipe) -> str:
    return recipe.implementation or "auto"


def _native_by_default(block_scaled: bool) -> bool:
    """``implementation=None``: FP8 products natively on any NVIDIA GPU, block-scaled FP4/FP8
    ones only where cuDNN has block-scaled GEMMs (Blackwell, compute capability >= 10)."""
    if jax.default_backend() != "gpu":
        return False
    if not block_scaled:
        return True
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    try:
        return float(capability) >= 10
    except ValueError:
        return False


def _keys(key):
    """One key per product (None without a key)."""
    if key is None:
        return {p: None for p in PRODUCTS}
    ks = jax.random.split(key, 3)
    return dict(zip(PRODUCTS, ks, strict=True))


def _operand(x, q, axis, key, histories, name, what):
    """``x`` quantized by ``q`` (a ``QuantizedOperand``), or ``x`` itself when ``q`` is None."""
    if q is None:
        return x
    return quantize_operand(x, q, axis, key=key, history=histories.get(name), what=what)


def _split(key, n):
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


def _forward(x, w, key, histories, recipe, implementation):
    f = recipe.forward
    x = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    if f.rotation:
        x = rotate(x, 1, f.rotation)
        w = rotate(w, 0, f.rotation)
    kl, kr = _split(key, 2)
    xq = _operand(x, f.lhs, 1, kl, histories, "forward_lhs", "forward x")
    wq = _operand(w, f.rhs, 0, kr, histories, "forward_rhs", "forward w")
    y = _product((f.lhs, f.rhs), (xq, wq), (1, 0), implementation)
    return y, (x, w, xq, wq)


def _backward_source(float_op, quantized, source):
    if source == "float" or not isinstance(quantized, QuantizedOperand):
        return float_op
    return quantized.dequantize()


def _gradient_product(recipe, product, g, operand, quantized, key, histories, implementation):
    """One backward product of ``g`` with ``operand`` (``x`` or ``w`` after the forward
    rotation; ``quantized``: its forward ``QuantizedOperand``, or the operand itself), both
    contracted along one axis: ``grad_input`` is ``g @ wᵀ`` (g the lhs, axis 1),
    ``grad_weight`` is ``xᵀ @ g`` (g the rhs, axis 0). Returns the product and the amax of
    each quantized operand, by history name."""
    p = getattr(recipe, product)
    if product == "grad_input":
        g_side, o_side, axis, name = "lhs", "rhs", 1, "w"
        source, forward_q = recipe.w_source, recipe.forward.rhs
    else:
        g_side, o_side, axis, name = "rhs", "lhs", 0, "x"
        source, forward_q = recipe.x_source, recipe.forward.lhs
    k_signs, k_lhs, k_rhs = _split(key, 3)
    keys = {"lhs": k_lhs, "rhs": k_rhs}
    other = _backward_source(operand, quantized, source)
    o_q = getattr(p, o_side)
    reuse = source == "forward" and o_q is None and isinstance(quantized, QuantizedOperand)
    if p.rotation:
        signs = _random_signs(k_signs, p.rotation) if p.random_signs else None
        g = rotate(g, axis, p.rotation, signs)
        other = rotate(other, axis, p.rotation, signs)
        reuse = False
    ops = {
        g_side: (
            getattr(p, g_side),
            _operand(
                g,
                getattr(p, g_side),
                axis,
                keys[g_side],
                histories,
                f"{product}_{g_side}",
                f"{product} g",
            ),
        ),
        o_side: (forward_q, quantized)
        if reuse
        else (
            o_q,
            _operand(
                other,
                o_q,
                axis,
                keys[o_side],
                histories,
                f"{product}_{o_side}",
                f"{product} {name}",
            ),
        ),
    }
    out = _product(
        (ops["lhs"][0], ops["rhs"][0]), (ops["lhs"][1], ops["rhs"][1]), (axis, axis), implementation
    )
    amaxes = {
        f"{product}_{side}": op.amax
        for side, (_, op) in ops.items()
        if isinstance(op, QuantizedOperand)
    }
    return out, amaxes


def _backward(g, saved, key, histories, recipe, implementation):
    x, w, xq, wq = saved
    g = g.astype(jnp.float32)
    dx, amax_i = _gradient_product(
        recipe, "grad_input", g, w, wq, key["grad_input"], histories, implementation
    )
    dw, amax_w = _gradient_product(
        recipe, "grad_weight", g, x, xq, key["grad_weight"], histories, implementation
    )
    # the forward's trust masks and rotation
    f = recipe.forward
    if isinstance(xq, QuantizedOperand) and xq.mask is not None:
        dx = jnp.where(xq.mask_2d(), dx, 0.0)
    if isinstance(wq, QuantizedOperand) and wq.mask is not None:
        dw = jnp.where(wq.mask_2d(), dw, 0.0)
    if f.rotation:
        dx = unrotate(dx, 1, f.rotation)
        dw = unrotate(dw, 0, f.rotation)
    return (dx, dw), {**amax_i, **amax_w}


def _roll(history: jax.Array, amax: jax.Array) -> jax.Array:
    """The history with ``amax`` first and the oldest entry dropped."""
    return jnp.concatenate([amax.reshape(1).astype(jnp.float32), history[:-1]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _train_matmul(x, w, key, histories, recipe, implementation):
    keys = _keys(key)
    return _forward(x, w, keys["forward"], histories, recipe, implementation)[0]


def _train_matmul_fwd(x, w, key, histories, recipe, implementation):
    keys = _keys(key)
    y, saved = _forward(x, w, keys["forward"], histories, recipe, implementation)
    fwd_amax = {}
    _, _, xq, wq = saved
    if isinstance(xq, QuantizedOperand):
        fwd_amax["forward_lhs"] = xq.amax
    if isinstance(wq, QuantizedOperand):
        fwd_amax["forward_rhs"] = wq.amax
    return y, (saved, keys, histories, fwd_amax)


def _train_matmul_bwd(recipe, implementation, res, g):
    saved, keys, histories, fwd_amax = res
    if keys["forward"] is None and (recipe.grad_input.needs_key or recipe.grad_weight.needs_key):
        raise ValueError(
            f"train_matmul: the gradient of recipe {recipe.name!r} rounds stochastically or "
            "draws random signs: pass key=jax.random.key(...) (a fresh one per step; layers "
            f"draw it from the {RNG_STREAM!r} rng stream: apply with rngs={{{RNG_STREAM!r}: key}})."
        )
    (dx, dw), amaxes = _backward(g, saved, keys, histories, recipe, implementation)
    amaxes = {**fwd_amax, **amaxes}
    new_histories = {name: _roll(h, amaxes[name]) for name, h in histories.items()}
    return dx, dw, None, new_histories


_train_matmul.defvjp(_train_matmul_fwd, _train_matmul_bwd)


def train_matmul(
    x: jax.Array,
    w: jax.Array,
    recipe: TrainingRecipe,
    *,
    key: jax.Array | None = None,
    histories: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """``x @ w`` with every product of its VJP quantized per ``recipe`` (module docstring).

    Args:
      x: float [M, K] (tokens by inputs).
      w: float [K, N].
      recipe: a ``TrainingRecipe`` (``get_training_recipe('nvfp4')``, ...).
      key: PRNG key, needed when the recipe rounds stochastically or draws random signs
        (``recipe.needs_key``); draw a fresh one per step.
      histories: ``{name: f32 [history]}`` for delayed-scaling operands
        (``recipe.init_histories()``); their gradients are the updated histories.

    Returns:
      f32 [M, N] (the product's accumulation type; cast as the caller needs).
    """
    if not isinstance(recipe, TrainingRecipe):
        raise TypeError(f"train_matmul recipe={recipe!r}: expected a TrainingRecipe.")
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"train_matmul: expected x [M, K] and w [K, N], got {tuple(x.shape)} and "
            f"{tuple(w.shape)}."
        )
    for name, a in (("x", x), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"train_matmul {name}: expected a float array, got {a.dtype}.")
    if recipe.forward.needs_key and key is None:
        raise ValueError(
            f"train_matmul: recipe {recipe.name!r} rounds stochastically in its forward pass; "
            "pass key=jax.random.key(...) (a fresh one per step)."
        )
    _check_shapes(recipe, *x.shape, w.shape[1])
    expected = recipe.history_names()
    histories = {} if histories is None else dict(histories)
    if set(histories) != set(expected):
        raise ValueError(
            f"train_matmul: recipe {recipe.name!r} needs amax histories {list(expected)}, got "
            f"{sorted(histories)} (recipe.init_histories() makes them)."
        )
    # f32 inside the custom VJP; the casts' own VJPs return gradients in x's and w's dtypes
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    return _train_matmul(x32, w32, key, histories, recipe, _pick_implementation(recipe))


def _check_shapes(recipe: TrainingRecipe, m: int, k: int, n: int) -> None:
    """Raises (before anything is traced) where a product's rotation or blocks do not divide
    the operands of x [m, k] @ w [k, n]."""
    # product -> (contracted length, (lhs rows, rhs rows))
    dims = {"forward": (k, (m, n)), "grad_input": (n, (m, k)), "grad_weight": (m, (k, n))}
    names = {
        "forward": ("x", "w"),
        "grad_input": ("g", "w"),
        "grad_weight": ("x", "g"),
    }
    for p in PRODUCTS:
        r = getattr(recipe, p)
        length, rows = dims[p]
        need = [(r.rotation, f"its Hadamard block of {r.rotation}")] if r.rotation else []
        for side, other, name in zip((r.lhs, r.rhs), rows, names[p], strict=True):
            if side is not None and side.granularity in ("block", "tile"):
                need.append((side.block, f"{name}'s blocks of {side.block}"))
                if side.granularity == "tile" and other % side.block:
                    raise ValueError(
                        f"training recipe {recipe.name!r}, {p} product: {name}'s "
                        f"{side.block}x{side.block} tiles do not divide its other axis of length "
                        f"{other} (x [{m}, {k}] @ w [{k}, {n}])."
                    )
        for block, what in need:
            if length % block:
                raise ValueError(
                    f"training recipe {recipe.name!r}, {p} product: {what} do not divide the "
                    f"contracted length {length} (x [{m}, {k}] @ w [{k}, {n}]; the forward "
                    "contracts K, the input gradient N, the weight gradient the M tokens)."
                )


# -- the recipes ------------------------------------------------------------------------------


def _fp8(granularity="tensor", delayed=False, fmt=F.E4M3):
    return OperandQuant(format=fmt, granularity=granularity, delayed=delayed)


# FP8 with current per-tensor scaling: E4M3 forward, E5M2 gradients; the backward reuses the
# forward's FP8 x and w (one scale per tensor is the same along either axis).
FP8_TRAIN = TrainingRecipe(
    name="fp8",
    forward=ProductRecipe(lhs=_fp8(), rhs=_fp8()),
    grad_input=ProductRecipe(lhs=_fp8(fmt=F.E5M2)),
    grad_weight=ProductRecipe(rhs=_fp8(fmt=F.E5M2)),
    x_source="forward",
    w_source="forward",
)
# FP8 with current per-row / per-column scaling: every operand scaled per row of its product
# (so the backward requantizes x and w along their other axis from the float values).
FP8_ROWWISE_TRAIN = TrainingRecipe(
    name="fp8_rowwise",
    forward=ProductRecipe(lhs=_fp8("channel"), rhs=_fp8("channel")),
    grad_input=ProductRecipe(lhs=_fp8("channel", fmt=F.E5M2), rhs=_fp8("channel")),
    grad_weight=ProductRecipe(lhs=_fp8("channel"), rhs=_fp8("channel", fmt=F.E5M2)),
)
# FP8 with delayed per-tensor scaling (Transformer Engine): each scale from an amax history.
FP8_DELAYED_TRAIN = TrainingRecipe(
    name="fp8_delayed",
    forward=ProductRecipe(lhs=_fp8(delayed=True), rhs=_fp8(delayed=True)),
    grad_input=ProductRecipe(lhs=_fp8(delayed=True, fmt=F.E5M2)),
    grad_weight=ProductRecipe(rhs=_fp8(delayed=True, fmt=F.E5M2)),
    x_source="forward",
    w_source="forward",
)
_QUEST = OperandQuant(
    format=F.E2M1, granularity="block", block=32, scale_dtype="e8m0", clip="quest"
)
_QUARTET_BWD = OperandQuant(
    format=F.E2M1, granularity="block", block=32, scale_dtype="e8m0", prescale=0.75
)
# Quartet: forward Hadamard(32) + QuEST on both operands; backward a random-sign Hadamard(32)
# per call, round-to-nearest MXFP4 of ¾ of the value (rescaled by 16/9), the trust mask, the
# inverse transform. The backward requantizes the forward's (rotated) quantized operands.
QUARTET_TRAIN = TrainingRecipe(
    name="mxfp4_quartet",
    forward=ProductRecipe(lhs=_QUEST, rhs=_QUEST, rotation=32),
    grad_input=ProductRecipe(lhs=_QUARTET_BWD, rhs=_QUARTET_BWD, rotation=32, random_signs=True),
    grad_weight=ProductRecipe(lhs=_QUARTET_BWD, rhs=_QUARTET_BWD, rotation=32, random_signs=True),
    x_source="forward",
    w_source="forward",
)


def _nvfp4(granularity="block", rounding="nearest"):
    return OperandQuant(
        format=F.E2M1,
        granularity=granularity,
        block=16,
        scale_dtype="e4m3",
        tensor_scale=True,
        rounding=rounding,
        scale_rounding="up" if rounding == "stochastic" else "nearest",
    )


# NVFP4 (arXiv 2509.25149): 1x16 blocks with E4M3 scales and an f32 tensor scale; weights in
# 16x16 tiles (the input gradient reuses the forward's quantized weight); a random Hadamard(16)
# on the weight gradient's inputs; stochastic rounding on gradients only. One change from the
# paper: the stochastically rounded gradients round their E4M3 block scale up, not to nearest,
# so a block's largest element never saturates and the estimate stays unbiased (a scale
# rounded down clips it in about half the blocks, biasing it by up to 6%: tests show both).
NVFP4_TRAIN = TrainingRecipe(
    name="nvfp4",
    forward=ProductRecipe(lhs=_nvfp4(), rhs=_nvfp4("tile")),
    grad_input=ProductRecipe(lhs=_nvfp4(rounding="stochastic")),
    grad_weight=ProductRecipe(
        lhs=_nvfp4(), rhs=_nvfp4(rounding="stochastic"), rotation=16, random_signs=True
    ),
    x_source="float",
    w_source="forward",
)

TRAINING_RECIPES: dict[str, TrainingRecipe] = {
    r.name: r for r in (FP8_TRAIN, FP8_ROWWISE_TRAIN, FP8_DELAYED_TRAIN, QUARTET_TRAIN, NVFP4_TRAIN)
}


def get_training_recipe(spec) -> TrainingRecipe:
    """A ``TrainingRecipe`` from itself or its name (``TRAINING_RECIPES``)."""
    if isinstance(spec, TrainingRecipe):
        return spec
    if isinstance(spec, str) and spec in TRAINING_RECIPES:
        return TRAINING_RECIPES[spec]
    raise ValueError(
        f"training recipe {spec!r}: expected a TrainingRecipe or one of {list(TRAINING_RECIPES)}."
    )
