"""VQArray, the vector-quantized weight, and the encoding behind ``VectorQuantizer.quantize``.

Terminology (see ``formats`` for vector, unit space, codes, codebook, lookup):
  matrix view: a weight of shape ``[K, *rest]`` contracted over axis 0 is handled as
               ``[K, N]`` with ``N = prod(rest)``.
  rotated:     with ``VectorQuantizer(rotate=True)`` the codes store ``w' = H_K S_in w S_out H_N``
               (``rotation``); without, ``w' = w``.
  scale:       f32 [K // g, N]: one per ``g = group_size`` rows (all K when None) and column.

Dequantization, with ``v[j, n] = format.decode(codes[j, n])`` (a d-vector) and ``g`` the
group size::

    w'[j*d + i, n] = v[j, n][i] · scale[(j*d + i) // g, n]
    w = S_in H_K w' H_N S_out   (rotated)   or   w = w'

Serving (``VQArray.dot_general``) computes ``x @ w`` as
``rotate_output(codebook_matmul(rotate_input(x), ...))`` when the format has lookup tables
(one ``codebook_matmul`` per stage and codebook group, summed/concatenated), else as
``x' @ w'`` with ``w'`` dequantized: the weight is never un-rotated, the two Hadamard
transforms act on activations.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.numerics import QuantizedTensor
from jaxquant.numerics.kernel_options import current_kernel_options
from jaxquant.numerics.qarray import dequantized_dot_general, is_plain_matmul, mesh_axis_size
from jaxquant.vq import rotation
from jaxquant.vq.formats import VectorFormat
from pallas_kernels import packing
from pallas_kernels.codebook_matmul import codebook_matmul


@struct.dataclass
class VQArray(QuantizedTensor):
    """A vector-quantized weight: codes, scales, an optional codebook and rotation signs.

    Invariants (K, N: the matrix view; d: ``format.vector_dim``; G: ``codebook_groups``; B:
    ``format.code_bytes``; g: ``group_size`` or K):
      * ``codes`` uint8 [K // d, N, B], or, for codes of ``b = format.code_bits < 8`` bits,
        bit-packed along N: uint8 [K // d, packing.packed_length(N, b)];
      * ``scale`` f32 [K // g, N];
      * ``codebook`` f32 [G, C, d] for learned formats (columns ``[c·N/G, (c+1)·N/G)`` use
        codebook c), else None;
      * ``signs_in`` uint8 [ceil(K / 8)] and ``signs_out`` uint8 [ceil(N / 8)] when the weight
        was rotated, else None.
    The dequantization equation is in the module docstring. A pytree: arrays are leaves, the
    shape, dtype and layout (format, group size, codebook groups) are static.
    """

    codes: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)
    format: VectorFormat = struct.field(pytree_node=False)
    group_size: int | None = struct.field(pytree_node=False, default=None)
    codebook_groups: int = struct.field(pytree_node=False, default=1)
    codebook: jax.Array | None = None
    signs_in: jax.Array | None = None
    signs_out: jax.Array | None = None

    @property
    def rotated(self) -> bool:
        return self.signs_in is not None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    def code_words(self) -> jax.Array:
        """uint8 [K // d, N, B]: the codes, unpacked."""
        return unpack_codes(self.codes, self.format, self.matrix_shape[1])

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
        if self.rotated:
            w = rotation.unrotate_weight(w, *self.signs())
        return w.reshape(self.shape).astype(self.dtype if dtype is None else dtype)

    def dot_general(self, lhs, dimension_numbers, precision=None, preferred_element_type=None):
        """``lax.dot_general(lhs, self.dequantize(lhs.dtype), dimension_numbers, ...)``.

        A plain ``lhs [..., K] @ self [K, ...]`` of a float32/bfloat16 ``lhs`` (with
        ``kernel_options(enabled=True)``, the default) rotates the activations instead of the
        weight and multiplies with ``pallas_kernels.codebook_matmul`` on the codes (one call
        per stage and codebook group) when the format has lookup tables, else with the rotated
        matrix; anything else is dequantized, then multiplied.
        """
        options = current_kernel_options()
        if not (
            options.enabled
            and lhs.dtype in (jnp.float32, jnp.bfloat16)
            and is_plain_matmul(lhs, dimension_numbers)
        ):
            return dequantized_dot_general(
                lhs, self, dimension_numbers, precision, preferred_element_type
            )
        out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
        k = self.matrix_shape[0]
        x2 = lhs.reshape(-1, k)
        if self.rotated:
            s_in, s_out = self.signs()
            x2 = rotation.rotate_input(x2.astype(jnp.float32), s_in).astype(x2.dtype)
        # codebook_matmul has no CPU kernel: kernel_options(implementation='cpu') (which picks
        # quantized_matmul's) runs its reference, which is what XLA's CPU backend runs anyway.
        implementation = "xla" if options.implementation == "cpu" else options.implementation
        y = _lookup_matmul(x2, self, implementation, options.interpret)
        if y is None:
            w = self.rotated_matrix()
            y = jnp.matmul(x2.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
        y = y.astype(jnp.float32)
        if self.rotated:
            y = rotation.rotate_output(y, s_out)
        return y.astype(out_dtype).reshape(lhs.shape[:-1] + tuple(self.shape[1:]))

    def shardings(self, weight_sharding: NamedSharding) -> VQArray:
        """The sharding of each array of this VQArray, given the float weight's ``[K, *rest]``.

        Codes and scales follow the weight's mesh axes on K (axis 0: ``K // d`` vectors,
        ``K // g`` scale rows) when every shard holds whole vectors and whole scale groups, and
        on the output columns when the weight is a matrix ``[K, N]`` sharded on N and each
        shard holds whole codebook groups and whole bytes of bit-packed codes; codebooks and
        rotation signs are replicated (they are small, and every column needs them). Works on
        concrete and abstract VQArrays.
        """
        mesh = weight_sharding.mesh
        spec = list(weight_sharding.spec) + [None] * (self.ndim - len(weight_sharding.spec))
        if len(spec) != self.ndim:
            raise ValueError(
                f"VQArray.shardings weight_sharding: spec {weight_sharding.spec} has more "
                f"dimensions than the VQArray's shape {self.shape}."
            )
        k, n = self.matrix_shape
        d, g = self.format.vector_dim, self.group_size or k

        def divides(entry, m: int) -> bool:
            return entry is not None and m % mesh_axis_size(mesh, entry) == 0

        # K: codes [K // d, ...] split when every device holds whole vectors, the scales
        # [K // g, N] when there is more than one group row and every device holds whole groups.
        row, scale_row = spec[0], None
        if not divides(row, k // d):
            row = None
        elif k // g > 1:
            scale_row = row if divides(row, k // g) else None
            row = row if scale_row is not None else None  # a device's codes need their scales
        # N (matrix weights only): whole codebook groups and whole bytes of packed codes.
        col = spec[1] if self.ndim == 2 else None
        if col is not None:
            size = mesh_axis_size(mesh, col)
            per_device = n // size if n % size == 0 else 0
            ok = per_device > 0 and (
                self.codebook_groups == 1 or per_device % (n // self.codebook_groups) == 0
            )
            if self.format.code_bits is not None:
                ok = ok and per_device * self.format.code_bits % 8 == 0
            col = col if ok else None
        codes_spec = (row, col) if self.codes.ndim == 2 else (row, col, None)
        replicated = NamedSharding(mesh, P())
        return self.replace(
            codes=NamedSharding(mesh, P(*codes_spec)),
            scale=NamedSharding(mesh, P(scale_row, col)),
            codebook=None if self.codebook is None else replicated,
            signs_in=None if self.signs_in is None else replicated,
            signs_out=None if self.signs_out is None else replicated,
        )


def _rotated_matrix(q: VQArray) -> jax.Array:
    fmt = q.format
    k, n = q.matrix_shape
    d = fmt.vector_dim
    nv = k // d
    codes = q.code_words()
    groups = q.codebook_groups
    cols = n // groups
    parts = []
    for c in range(groups):
        cb = None if q.codebook is None else q.codebook[c]
        sub = codes[:, c * cols : (c + 1) * cols].reshape(nv * cols, -1)
        parts.append(fmt.decode(sub, cb).reshape(nv, cols, d))
    v = jnp.concatenate(parts, axis=1) if groups > 1 else parts[0]  # [K // d, N, d]
    w = v.transpose(0, 2, 1).reshape(k, n)
    g = q.group_size or k
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


def group_rms_scale(w2: jax.Array, quantizer) -> jax.Array:
    """f32 [K // g, N]: each group's RMS times the format's unit scale (1 for all-zero groups)."""
    k, n = w2.shape
    g = quantizer.group_size or k
    rms = jnp.sqrt(jnp.mean(jnp.square(w2.reshape(k // g, g, n)), axis=1))
    return jnp.where(rms > 0, rms * quantizer.format.unit_scale, 1.0)


def rotation_signs(seed: int, k: int, n: int):
    """(signs_in, signs_out) packed bits for a ``[k, n]`` weight, drawn from ``seed``."""
    k_in, k_out = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0x8AD))
    return rotation.random_signs(k_in, k), rotation.random_signs(k_out, n)


def expand_scale(scale: jax.Array, k: int, g: int) -> jax.Array:
    """[K // g, N] -> [K, N]."""
    return (
        jnp.repeat(scale, g, axis=0) if g != k else jnp.broadcast_to(scale, (k,) + scale.shape[1:])
    )


def encode_matrix(x2: jax.Array, codebook, quantizer, weights=None) -> jax.Array:
    """uint8 [K // d, N, B]: codes of a unit-space matrix ``x2`` [K, N] (codebook [G, C, d])."""
    fmt = quantizer.format
    d = fmt.vector_dim
    v = vectors(x2, d)
    wv = None if weights is None else vectors(weights, d)
    nv, n, _ = v.shape
    groups = quantizer.codebook_groups
    cols = n // groups
    parts = []
    for c in range(groups):
        sl = slice(c * cols, (c + 1) * cols)
        cb = None if codebook is None else codebook[c]
        wsub = None if wv is None else wv[:, sl].reshape(-1, d)
        parts.append(fmt.encode(v[:, sl].reshape(-1, d), cb, wsub).reshape(nv, cols, -1))
    return jnp.concatenate(parts, axis=1) if groups > 1 else parts[0]


def fit_codebook(x2: jax.Array, quantizer, key, weights=None) -> jax.Array | None:
    """f32 [G, C, d] codebooks of a unit-space matrix (learned formats), else None."""
    fmt = quantizer.format
    if not fmt.learned:
        return None
    d = fmt.vector_dim
    v = vectors(x2, d)
    wv = None if weights is None else vectors(weights, d)
    groups = quantizer.codebook_groups
    cols = v.shape[1] // groups
    out = []
    for c, kc in enumerate(jax.random.split(key, groups)):
        sl = slice(c * cols, (c + 1) * cols)
        wsub = None if wv is None else wv[:, sl].reshape(-1, d)
        out.append(fmt.fit(v[:, sl].reshape(-1, d), wsub, kc))
    return jnp.stack(out)


def unit_matrix(w2: jax.Array, quantizer) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(unit-space matrix, scale [K // g, N], full scale [K, N]) of a (rotated) matrix ``w2``."""
    k = w2.shape[0]
    scale = group_rms_scale(w2, quantizer)
    full = expand_scale(scale, k, quantizer.group_size or k)
    return w2 / full, scale, full


@functools.partial(jax.jit, static_argnames=("quantizer",))
def encode_weight(w, importance, codebook, *, quantizer) -> VQArray:
    """Round-to-nearest vector quantization of a weight ``[K, *rest]`` (arguments checked by
    ``VectorQuantizer.quantize``): rotate, scale each group to unit RMS, fit the codebook
    (learned formats, unless ``codebook`` [G, C, d] is given), encode every vector to its
    nearest code (weighted by ``importance`` [K] where the format's search takes weights), and
    refit each scale by least squares on its decoded group (``quantizer.refit_scale``)."""
    k, n = w.shape[0], math.prod(w.shape[1:])
    w2 = as_matrix(w)
    signs_in = signs_out = None
    if quantizer.rotate:
        signs_in, signs_out = rotation_signs(quantizer.seed, k, n)
        s_in, s_out = rotation.unpack_signs(signs_in, k), rotation.unpack_signs(signs_out, n)
        w2 = rotation.rotate_weight(w2, s_in, s_out)
        if importance is not None:  # diag(H_K S D S H_K) for a diagonal D
            h = rotation.rotate_hessian(jnp.diag(importance), s_in)
            importance = jnp.diag(h)
    x2, scale, full = unit_matrix(w2, quantizer)
    weights = None
    if importance is not None:
        weights = jnp.maximum(importance, 0.0)[:, None] * jnp.square(full)
    if codebook is None:
        codebook = fit_codebook(x2, quantizer, jax.random.key(quantizer.seed), weights)
    else:
        codebook = codebook.astype(jnp.float32)
    codes = encode_matrix(x2, codebook, quantizer, weights)
    q = assemble(codes, scale, w, quantizer, codebook, signs_in, signs_out)
    if quantizer.refit_scale:
        q = q.replace(scale=refit_scale(q, w2, importance))
    return q


def assemble(codes, scale, w, quantizer, codebook, signs_in, signs_out) -> VQArray:
    """The VQArray of a weight ``w`` (its shape and dtype) from unpacked codes
    [K // d, N, B], scales, the codebook and rotation signs, laid out by ``quantizer``."""
    return VQArray(
        codes=pack_codes(codes, quantizer.format),
        scale=scale,
        shape=tuple(w.shape),
        dtype=np.dtype(w.dtype),
        format=quantizer.format,
        group_size=quantizer.group_size,
        codebook_groups=quantizer.codebook_groups,
        codebook=codebook,
        signs_in=signs_in,
        signs_out=signs_out,
    )


def refit_scale(q: VQArray, w2: jax.Array, importance=None) -> jax.Array:
    """Per group and column, the least-squares scale ``<w', v>_h / <v, v>_h`` of the decoded
    unit-space values ``v`` (``h``: importance per row, 1 by default); the old scale where
    ``v`` is 0."""
    k, n = w2.shape
    g = q.group_size or k
    unit = q.replace(scale=jnp.ones_like(q.scale)).rotated_matrix()
    h = jnp.ones((k, 1)) if importance is None else jnp.maximum(importance, 0.0)[:, None]
    num = jnp.sum((h * w2 * unit).reshape(k // g, g, n), axis=1)
    den = jnp.sum((h * unit * unit).reshape(k // g, g, n), axis=1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), q.scale)


def _lookup_matmul(x2, q: VQArray, implementation, interpret):
    """``x2 @ w'`` through ``codebook_matmul`` (f32), or None when the format has no tables."""
    fmt = q.format
    k, n = q.matrix_shape
    d = fmt.vector_dim
    if not 2 <= d <= 8:
        return None
    nv = k // d
    groups = q.codebook_groups
    cols = n // groups
    g = q.group_size
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
