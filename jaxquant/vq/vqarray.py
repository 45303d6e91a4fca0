"""VQArray, the vector-quantized weight, and ``quantize_vq``, ``vq_matmul``, ``fake_quant_vq``.

Terminology (see ``formats`` for vector, unit space, codes, codebook, lookup):
  matrix view: a weight of shape ``[K, *rest]`` contracted over axis 0 is handled as
               ``[K, N]`` with ``N = prod(rest)``.
  rotated:     with ``VQ(rotate=True)`` the codes store ``w' = H_K S_in w S_out H_N``
               (``rotation``); without, ``w' = w``.
  scale:       f32 [K // g, N]: one per ``g = group_size`` rows (all K when None) and column.

Dequantization, with ``v[j, n] = format.decode(codes[j, n])`` (a d-vector) and ``g`` the
group size::

    w'[j*d + i, n] = v[j, n][i] · scale[(j*d + i) // g, n]
    w = S_in H_K w' H_N S_out   (rotated)   or   w = w'

Serving (``vq_matmul``) computes ``x @ w`` as ``rotate_output(codebook_matmul(rotate_input(x),
...))`` when the format has lookup tables (one ``codebook_matmul`` per stage and codebook
group, summed/concatenated), else as ``x' @ w'`` with ``w'`` dequantized: the weight is never
un-rotated, the two Hadamard transforms act on activations.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxquant.numerics.qarray import QuantizedTensor, check_input
from jaxquant.vq import rotation
from jaxquant.vq.formats import VQ
from pallas_kernels import packing
from pallas_kernels.codebook_matmul import codebook_matmul


@struct.dataclass
class VQArray(QuantizedTensor):
    """A vector-quantized weight: codes, scales, an optional codebook and rotation signs.

    Invariants (K, N: the matrix view; d: ``recipe.format.vector_dim``; G:
    ``recipe.codebook_groups``; B: ``recipe.format.code_bytes``):
      * ``codes`` uint8 [K // d, N, B], or, for codes of ``b = format.code_bits < 8`` bits,
        bit-packed along N: uint8 [K // d, packing.packed_length(N, b)];
      * ``scale`` f32 [K // g, N];
      * ``codebook`` f32 [G, C, d] for learned formats (columns ``[c·N/G, (c+1)·N/G)`` use
        codebook c), else None;
      * ``signs_in`` uint8 [ceil(K / 8)] and ``signs_out`` uint8 [ceil(N / 8)] with
        ``recipe.rotate``, else None.
    The dequantization equation is in the module docstring. A pytree: arrays are leaves, the
    shape, dtype and recipe are static.
    """

    codes: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)
    recipe: VQ = struct.field(pytree_node=False)
    codebook: jax.Array | None = None
    signs_in: jax.Array | None = None
    signs_out: jax.Array | None = None

    @property
    def format(self):
        """The recipe (its ``name`` is what reports print)."""
        return self.recipe

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def code_words(self) -> jax.Array:
        """uint8 [K // d, N, B]: the codes, unpacked."""
        return unpack_codes(self.codes, self.recipe.format, self.matrix_shape[1])

    def rotated_matrix(self) -> jax.Array:
        """f32 [K, N]: ``w'``, the weight in the rotated basis the codes describe."""
        return _rotated_matrix(self)

    def signs(self) -> tuple[jax.Array, jax.Array]:
        """(s_in f32 [K], s_out f32 [N]) of ±1."""
        k, n = self.matrix_shape
        return (
            rotation.unpack_signs(self.signs_in, k),
            rotation.unpack_signs(self.signs_out, n),
        )

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight the codes stand for, in ``dtype`` (default ``self.dtype``)."""
        w = self.rotated_matrix()
        if self.recipe.rotate:
            w = rotation.unrotate_weight(w, *self.signs())
        return w.reshape(self.shape).astype(self.dtype if dtype is None else dtype)

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / size``: every overhead counted."""
        return 8 * self.nbytes / self.size


def _rotated_matrix(q: VQArray) -> jax.Array:
    fmt = q.recipe.format
    k, n = q.matrix_shape
    d = fmt.vector_dim
    nv = k // d
    codes = q.code_words()
    groups = q.recipe.codebook_groups
    cols = n // groups
    parts = []
    for c in range(groups):
        cb = None if q.codebook is None else q.codebook[c]
        sub = codes[:, c * cols : (c + 1) * cols].reshape(nv * cols, -1)
        parts.append(fmt.decode(sub, cb).reshape(nv, cols, d))
    v = jnp.concatenate(parts, axis=1) if groups > 1 else parts[0]  # [K // d, N, d]
    w = v.transpose(0, 2, 1).reshape(k, n)
    g = q.recipe.group_size or k
    return (w.reshape(k // g, g, n) * q.scale[:, None, :]).reshape(k, n)


def pack_codes(codes: jax.Array, fmt) -> jax.Array:
    """Stored codes from [K // d, N, B] (bit-packed along N when ``fmt.code_bits``)."""
    if fmt.code_bits is None:
        return codes
    return packing.pack(codes[..., 0], fmt.code_bits)


def unpack_codes(codes: jax.Array, fmt, n: int) -> jax.Array:
    """The inverse of ``pack_codes``: uint8 [K // d, N, B]."""
    if fmt.code_bits is None:
        return codes
    return packing.unpack(codes, fmt.code_bits, n)[..., None]


def as_matrix(w: jax.Array) -> jax.Array:
    """f32 [K, N]: a ``[K, *rest]`` weight's matrix view."""
    return w.astype(jnp.float32).reshape(w.shape[0], -1)


def vectors(w2: jax.Array, d: int) -> jax.Array:
    """[K // d, N, d]: vector ``(j, n)`` is ``w2[j*d:(j+1)*d, n]``."""
    k, n = w2.shape
    return w2.reshape(k // d, d, n).transpose(0, 2, 1)


def from_vectors(v: jax.Array) -> jax.Array:
    """The inverse of ``vectors``: [K // d, N, d] -> [K, N]."""
    nv, n, d = v.shape
    return v.transpose(0, 2, 1).reshape(nv * d, n)


def group_rms_scale(w2: jax.Array, recipe: VQ) -> jax.Array:
    """f32 [K // g, N]: each group's RMS times the format's unit scale (1 for all-zero groups)."""
    k, n = w2.shape
    g = recipe.group_size or k
    rms = jnp.sqrt(jnp.mean(jnp.square(w2.reshape(k // g, g, n)), axis=1))
    return jnp.where(rms > 0, rms * recipe.format.unit_scale, 1.0)


def rotation_signs(recipe: VQ, k: int, n: int):
    """(signs_in, signs_out) packed bits for a ``[k, n]`` weight, from ``recipe.seed``."""
    k_in, k_out = jax.random.split(jax.random.fold_in(jax.random.key(recipe.seed), 0x8AD))
    return rotation.random_signs(k_in, k), rotation.random_signs(k_out, n)


def expand_scale(scale: jax.Array, k: int, g: int) -> jax.Array:
    """[K // g, N] -> [K, N]."""
    return (
        jnp.repeat(scale, g, axis=0) if g != k else jnp.broadcast_to(scale, (k,) + scale.shape[1:])
    )


def encode_matrix(x2: jax.Array, codebook, recipe: VQ, weights=None) -> jax.Array:
    """uint8 [K // d, N, B]: codes of a unit-space matrix ``x2`` [K, N] (codebook [G, C, d])."""
    fmt = recipe.format
    d = fmt.vector_dim
    v = vectors(x2, d)
    wv = None if weights is None else vectors(weights, d)
    nv, n, _ = v.shape
    groups = recipe.codebook_groups
    cols = n // groups
    parts = []
    for c in range(groups):
        sl = slice(c * cols, (c + 1) * cols)
        cb = None if codebook is None else codebook[c]
        wsub = None if wv is None else wv[:, sl].reshape(-1, d)
        parts.append(fmt.encode(v[:, sl].reshape(-1, d), cb, wsub).reshape(nv, cols, -1))
    return jnp.concatenate(parts, axis=1) if groups > 1 else parts[0]


def fit_codebook(x2: jax.Array, recipe: VQ, key, weights=None) -> jax.Array | None:
    """f32 [G, C, d] codebooks of a unit-space matrix (learned formats), else None."""
    fmt = recipe.format
    if not fmt.learned:
        return None
    d = fmt.vector_dim
    v = vectors(x2, d)
    wv = None if weights is None else vectors(weights, d)
    groups = recipe.codebook_groups
    cols = v.shape[1] // groups
    out = []
    for c, kc in enumerate(jax.random.split(key, groups)):
        sl = slice(c * cols, (c + 1) * cols)
        wsub = None if wv is None else wv[:, sl].reshape(-1, d)
        out.append(fmt.fit(v[:, sl].reshape(-1, d), wsub, kc))
    return jnp.stack(out)


def quantize_vq(
    w: jax.Array,
    recipe: VQ,
    *,
    importance: jax.Array | None = None,
    codebook: jax.Array | None = None,
) -> VQArray:
    """Vector-quantizes a weight ``[K, *rest]`` (contracted over axis 0) with ``recipe``.

    Rotate (``recipe.rotate``), scale each group to unit RMS, fit the codebook (learned
    formats), encode every vector, and (``recipe.refit_scale``) refit each scale by least
    squares on its decoded group.

    Args:
      w: float ``[K, *rest]``.
      recipe: a ``VQ``.
      importance: optional f32 [K], the importance of each input row (the Hessian diagonal
        ``diag(Σ x xᵀ)``), in the un-rotated basis; k-means weights its distortion by it and
        formats with a weighted search use it. With ``rotate`` the rotated diagonal is used.
      codebook: learned formats: f32 [G, C, d] codebooks to encode with instead of fitting
        them (e.g. DKM's, trained in QAT).

    Returns:
      A ``VQArray`` of ``w.shape`` and ``w.dtype``.

    Example:
      >>> q = quantize_vq(w, VQ(format=KMeans(vector_dim=4, index_bits=8)))   # 2 bits/weight
      >>> y = vq_matmul(x, q)
    """
    w = check_input(w, "quantize_vq w")
    if not isinstance(recipe, VQ):
        raise TypeError(f"quantize_vq recipe={recipe!r}: expected a VQ.")
    if w.ndim < 2:
        raise ValueError(f"quantize_vq w: expected a weight [K, *rest], got shape {w.shape}.")
    k, n = w.shape[0], math.prod(w.shape[1:])
    recipe.check_shape(k, n)
    if importance is not None:
        importance = jnp.asarray(importance, jnp.float32)
        if importance.shape != (k,):
            raise ValueError(
                f"quantize_vq importance: expected shape ({k},), got {importance.shape}."
            )
    if codebook is not None:
        fmt = recipe.format
        expected = (recipe.codebook_groups, getattr(fmt, "num_codewords", -1), fmt.vector_dim)
        if not fmt.learned or tuple(codebook.shape) != expected:
            raise ValueError(
                f"quantize_vq codebook: expected f32 {expected} for {recipe.name} (a learned "
                f"format), got {getattr(codebook, 'shape', codebook)}."
            )
    return _quantize_vq(w, importance, codebook, recipe=recipe)


@functools.partial(jax.jit, static_argnames=("recipe",))
def _quantize_vq(w, importance, codebook, *, recipe: VQ) -> VQArray:
    k, n = w.shape[0], math.prod(w.shape[1:])
    w2 = as_matrix(w)
    signs_in = signs_out = None
    if recipe.rotate:
        signs_in, signs_out = rotation_signs(recipe, k, n)
        s_in, s_out = rotation.unpack_signs(signs_in, k), rotation.unpack_signs(signs_out, n)
        w2 = rotation.rotate_weight(w2, s_in, s_out)
        if importance is not None:  # diag(H_K S D S H_K) for a diagonal D
            h = rotation.rotate_hessian(jnp.diag(importance), s_in)
            importance = jnp.diag(h)
    scale = group_rms_scale(w2, recipe)
    g = recipe.group_size or k
    full = expand_scale(scale, k, g)
    x2 = w2 / full
    weights = None
    if importance is not None:
        weights = jnp.maximum(importance, 0.0)[:, None] * jnp.square(full)
    if codebook is None:
        codebook = fit_codebook(x2, recipe, jax.random.key(recipe.seed), weights)
    else:
        codebook = codebook.astype(jnp.float32)
    codes = encode_matrix(x2, codebook, recipe, weights)
    q = VQArray(
        codes=pack_codes(codes, recipe.format),
        scale=scale,
        shape=tuple(w.shape),
        dtype=np.dtype(w.dtype),
        recipe=recipe,
        codebook=codebook,
        signs_in=signs_in,
        signs_out=signs_out,
    )
    if recipe.refit_scale:
        q = q.replace(scale=refit_scale(q, w2, importance))
    return q


def refit_scale(q: VQArray, w2: jax.Array, importance=None) -> jax.Array:
    """Per group and column, the least-squares scale ``<w', v>_h / <v, v>_h`` of the decoded
    unit-space values ``v`` (``h``: importance per row, 1 by default); the old scale where
    ``v`` is 0."""
    k, n = w2.shape
    g = q.recipe.group_size or k
    unit = q.replace(scale=jnp.ones_like(q.scale)).rotated_matrix()
    h = jnp.ones((k, 1)) if importance is None else jnp.maximum(importance, 0.0)[:, None]
    num = jnp.sum((h * w2 * unit).reshape(k // g, g, n), axis=1)
    den = jnp.sum((h * unit * unit).reshape(k // g, g, n), axis=1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), q.scale)


def vq_matmul(
    x: jax.Array,
    q: VQArray,
    *,
    out_dtype=None,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x @ q.dequantize()`` for ``x`` [..., K]: rotations on the activations, and
    ``codebook_matmul`` on the codes when the format has lookup tables.

    Args:
      x: float32 or bfloat16 [..., K].
      q: a ``VQArray`` of shape ``[K, *rest]``.
      out_dtype: the result's dtype (default ``x.dtype``).
      implementation, interpret: passed to ``codebook_matmul``.

    Returns:
      [..., *rest] in ``out_dtype``.
    """
    k, n = q.matrix_shape
    if x.shape[-1] != k:
        raise ValueError(f"vq_matmul x: last axis {x.shape[-1]} != the weight's K={k}.")
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.dtype not in (jnp.float32, jnp.bfloat16):
        x2 = x2.astype(jnp.float32)
    if q.recipe.rotate:
        s_in, s_out = q.signs()
        x2 = rotation.rotate_input(x2.astype(jnp.float32), s_in).astype(x2.dtype)
    y = _lookup_matmul(x2, q, implementation, interpret)
    if y is None:
        w = q.rotated_matrix()
        y = jnp.matmul(x2.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    y = y.astype(jnp.float32)
    if q.recipe.rotate:
        y = rotation.rotate_output(y, s_out)
    return y.astype(out_dtype).reshape(lead + tuple(q.shape[1:]))


def _lookup_matmul(x2, q: VQArray, implementation, interpret):
    """``x2 @ w'`` through ``codebook_matmul`` (f32), or None when the format has no tables."""
    fmt = q.recipe.format
    k, n = q.matrix_shape
    d = fmt.vector_dim
    if not 2 <= d <= 8:
        return None
    nv = k // d
    groups = q.recipe.codebook_groups
    cols = n // groups
    g = q.recipe.group_size
    codes = q.code_words()
    outs = []
    for c in range(groups):
        cb = None if q.codebook is None else q.codebook[c]
        sub = codes[:, c * cols : (c + 1) * cols].reshape(nv * cols, -1)
        stages = fmt.lookup(sub, cb)
        if stages is None:
            return None
        scales = q.scale[:, c * cols : (c + 1) * cols]
        y = 0.0
        for bits, idx, table in stages:
            if not 4 <= bits <= 16:
                return None
            y = y + codebook_matmul(
                x2,
                idx.reshape(nv, cols),
                table.astype(jnp.float32),
                scales,
                vector_dim=d,
                index_bits=bits,
                group_size=g,
                out_dtype=jnp.float32,
                implementation=implementation,
                interpret=interpret,
            )
        outs.append(y)
    return jnp.concatenate(outs, axis=1) if groups > 1 else outs[0]


def fake_quant_vq(w: jax.Array, recipe: VQ) -> jax.Array:
    """Quantize-dequantize with a straight-through gradient (``d out / d w = 1``): the forward
    value is ``quantize_vq(w, recipe).dequantize()``."""
    wq = jax.lax.stop_gradient(quantize_vq(jax.lax.stop_gradient(w), recipe).dequantize())
    return wq + (w - jax.lax.stop_gradient(w))


def _per_codebook_group(x2: jax.Array, codebook: jax.Array, recipe: VQ, fn) -> list:
    """``fn(vectors [M_c, d], codebook[c])`` for each codebook group c of the columns."""
    d = recipe.format.vector_dim
    v = vectors(x2, d)
    nv, n, _ = v.shape
    cols = n // recipe.codebook_groups
    return [
        fn(v[:, c * cols : (c + 1) * cols].reshape(-1, d), codebook[c])
        for c in range(recipe.codebook_groups)
    ]


def dkm_fake_quant_matrix(x2: jax.Array, codebook: jax.Array, recipe: VQ) -> jax.Array:
    """DKM's soft-quantized unit-space matrix [K, N] (``dkm.dkm_fake_quant`` on its vectors,
    one codebook [C, d] per codebook group), differentiable in ``x2`` and ``codebook``."""
    from jaxquant.vq import dkm

    d = recipe.format.vector_dim
    nv = x2.shape[0] // d
    parts = _per_codebook_group(
        x2,
        codebook,
        recipe,
        lambda v, cb: dkm.dkm_fake_quant(
            v, cb, temperature=recipe.dkm_temperature, iters=recipe.dkm_iters
        ).reshape(nv, -1, d),
    )
    return from_vectors(jnp.concatenate(parts, axis=1))


def dkm_final_codebook(x2: jax.Array, codebook: jax.Array, recipe: VQ) -> jax.Array:
    """[G, C, d]: the codebooks after DKM's soft k-means iterations on ``x2`` (what freeze
    assigns the vectors to)."""
    from jaxquant.vq import dkm

    return jnp.stack(
        _per_codebook_group(
            x2,
            codebook,
            recipe,
            lambda v, cb: dkm.dkm_codebook(
                v, cb, temperature=recipe.dkm_temperature, iters=recipe.dkm_iters
            ),
        )
    )
