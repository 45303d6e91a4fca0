"""Vector formats: what the code of one vector of weights can be (``VectorQuantizer``, in
``quantizer``, adds scales, codebooks, rotation and the QAT mode).

Terminology:
  vector:      ``vector_dim`` (d) consecutive weights of one output column along the input
               axis K: vector ``(j, n)`` is ``w[j*d : (j+1)*d, n]``. (For the trellis, d is
               the length T of one trellis sequence.)
  unit space:  weights divided by their scale (the RMS of their group times
               ``format.unit_scale``), so they are roughly N(0, 1); formats encode and decode
               there.
  codes:       uint8 [M, code_bytes]: the little-endian bytes of one vector's code words
               (e.g. an E8P index is 2 bytes; 3-bit E8P + residual is 2 + 1).
  codebook:    a learned format's data-fitted table f32 [C, d], stored with the array; formats
               with a fixed (computed) codebook store none.
  lookup:      what ``codebook_matmul`` reads: per stage, the index bits, indices and a
               [2**bits, d] table; a vector's value is the sum over stages of
               ``table_s[index_s]``.

Every format defines ``encode`` (x [M, d] in unit space -> codes) and ``decode`` (codes ->
[M, d]); ``code_bits_per_weight`` is the information rate of its codes (the stored rate is
``8 * code_bytes / d``, or ``code_bits / d`` for bit-packed codes); ``gaussian_mse`` measures
its distortion on N(0, 1) samples.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.vq import e8p as e8p_lib
from jaxquant.vq import pyramid as pyramid_lib
from jaxquant.vq import trellis as trellis_lib
from jaxquant.vq.kmeans import assign, kmeans


def words_to_bytes(words: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """uint8 [M, sum(widths)]: column s of ``words`` [M, S] (non-negative ints) as ``widths[s]``
    little-endian bytes."""
    w = words.astype(jnp.uint32)
    out = []
    for s, nb in enumerate(widths):
        for b in range(nb):
            out.append(((w[:, s] >> (8 * b)) & 0xFF).astype(jnp.uint8))
    return jnp.stack(out, axis=1)


def bytes_to_words(codes: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """The inverse of ``words_to_bytes``: uint32 [M, S]."""
    c = codes.astype(jnp.uint32)
    out, i = [], 0
    for nb in widths:
        v = jnp.zeros(c.shape[:1], jnp.uint32)
        for b in range(nb):
            v = v | (c[:, i] << (8 * b))
            i += 1
        out.append(v)
    return jnp.stack(out, axis=1)


def index_bytes(bits: int) -> int:
    """Bytes of one stored index of ``bits`` bits (1, 2 or 4)."""
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


class VectorFormat(abc.ABC):
    """Base class of vector formats (frozen dataclasses: hashable, static under jit)."""

    vector_dim: int
    learned = False  # True: ``fit`` makes a codebook stored with each array

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short lowercase name, e.g. ``kmeans_d4_b8``, ``e8p2``."""

    @property
    @abc.abstractmethod
    def code_bytes(self) -> int:
        """Stored bytes per vector."""

    @property
    @abc.abstractmethod
    def code_bits_per_weight(self) -> float:
        """Information bits per weight of the codes (no scales, no stored codebook)."""

    @property
    def code_bits(self) -> int | None:
        """Bits of a code that is one word narrower than a byte (stored bit-packed along the
        output axis, ``pallas_kernels.packing``), else None (stored as ``code_bytes``)."""
        return None

    @property
    def unit_scale(self) -> float:
        """The scale, in units of the RMS of a group, that makes the group fit the code."""
        return 1.0

    def fit(self, x: jax.Array, weights: jax.Array | None, key: jax.Array) -> jax.Array | None:
        """A codebook for unit-space vectors ``x`` [M, d] (learned formats), else None."""
        del x, weights, key
        return None

    @abc.abstractmethod
    def encode(self, x: jax.Array, codebook, weights: jax.Array | None = None) -> jax.Array:
        """uint8 [M, code_bytes]: the codes of unit-space vectors ``x`` [M, d]; ``weights``
        [M, d] (importance of each element) where the format's search can use them."""

    @abc.abstractmethod
    def decode(self, codes: jax.Array, codebook) -> jax.Array:
        """f32 [M, d]: the unit-space vectors of ``codes``."""

    def lookup(self, codes: jax.Array, codebook) -> list[tuple[int, jax.Array, jax.Array]] | None:
        """What ``codebook_matmul`` reads, per stage: ``(index_bits, indices, table)`` with
        indices uint8/uint16 [M] (uint8 up to 8 bits) and table f32 [2**index_bits, d], such that
        ``decode(codes)[m] = Σ_stages table[indices[m]]``; None when the format is not served by
        table lookup (it is then dequantized, then multiplied)."""
        del codes, codebook
        return None

    def gaussian_mse(self, num: int = 2**16, seed: int = 0) -> float:
        """MSE of ``s · decode(encode(x / s))`` on ``num`` N(0, 1) samples (numpy PCG64
        ``seed``, in rows of ``vector_dim``), ``s = unit_scale``; a learned format fits its
        codebook to the same samples. Compare with the Shannon bound ``2^(−2R)`` at
        ``R = code_bits_per_weight``."""
        d = self.vector_dim
        if isinstance(num, bool) or not isinstance(num, int) or num < d or num % d:
            raise ValueError(
                f"{self.name} gaussian_mse num={num!r}: expected a positive multiple of {d}."
            )
        x = np.random.default_rng(seed).standard_normal((num // d, d))
        xf = jnp.asarray(x, jnp.float32)
        s = self.unit_scale
        codebook = self.fit(xf / s, None, jax.random.key(seed)) if self.learned else None
        y = s * np.asarray(self.decode(self.encode(xf / s, codebook), codebook), np.float64)
        return float(np.mean((x - y) ** 2))

    def check_dims(self) -> None:
        d = self.vector_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{type(self).__name__} vector_dim={d!r}: expected an int >= 1.")

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class KMeans(VectorFormat):
    """A k-means codebook of ``2**index_bits`` codewords of ``vector_dim`` (1 to 8) elements,
    fitted to each weight (k-means++ then Lloyd, weighted by the Hessian diagonal when the
    caller has one): ``index_bits / vector_dim`` bits per weight plus the f32 codebook.

    References: van Baalen et al., "GPTVQ", arXiv:2402.15319, Sec. 3; Gersho & Gray, "Vector
    Quantization and Signal Compression", Ch. 11.
    """

    vector_dim: int
    index_bits: int
    iters: int = 100
    learned = True

    def __post_init__(self):
        self.check_dims()
        if not 1 <= self.vector_dim <= 8:
            raise ValueError(f"KMeans vector_dim={self.vector_dim}: expected 1 to 8.")
        b = self.index_bits
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise ValueError(f"KMeans index_bits={b!r}: expected an int from 1 to 16.")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"KMeans iters={self.iters!r}: expected an int >= 0.")

    @property
    def name(self) -> str:
        return f"kmeans_d{self.vector_dim}_b{self.index_bits}"

    @property
    def num_codewords(self) -> int:
        return 2**self.index_bits

    @property
    def code_bytes(self) -> int:
        return index_bytes(self.index_bits)

    @property
    def code_bits(self) -> int | None:
        return self.index_bits if self.index_bits < 8 else None

    @property
    def code_bits_per_weight(self) -> float:
        return self.index_bits / self.vector_dim

    def fit(self, x, weights, key):
        m = x.shape[0]
        c = self.num_codewords
        if m < c:
            raise ValueError(
                f"{self.name}: {m} vectors cannot fit a codebook of {c} codewords; use fewer "
                "index_bits or quantize a larger tensor (or fewer codebook_groups)."
            )
        return kmeans(x, c, weights=weights, iters=self.iters, key=key)

    def encode(self, x, codebook, weights=None):
        idx = assign(x, codebook, weights)
        return words_to_bytes(idx[:, None], (self.code_bytes,))

    def decode(self, codes, codebook):
        idx = bytes_to_words(codes, (self.code_bytes,))[:, 0].astype(jnp.int32)
        return jnp.asarray(codebook, jnp.float32)[idx]

    def lookup(self, codes, codebook):
        if self.vector_dim < 2 or self.index_bits < 4:
            return None  # codebook_matmul reads 2- to 8-vectors with 4- to 16-bit indices
        idx = bytes_to_words(codes, (self.code_bytes,))[:, 0]
        idx = idx.astype(jnp.uint8 if self.index_bits <= 8 else jnp.uint16)
        return [(self.index_bits, idx, jnp.asarray(codebook, jnp.float32))]


@dataclasses.dataclass(frozen=True)
class E8P(VectorFormat):
    """QuIP#'s E8P lattice codebook: 8-vectors of ``E8 + ¼`` from a 16-bit index (2 bits per
    weight), decoded arithmetically (no stored codebook); ``bits=3`` adds a residual stage of
    the 256 smallest E8 points (8-bit index), ``bits=4`` a second E8P stage (``e8p``).
    Meant for rotated (``VQ(rotate=True)``), hence Gaussian-like, weights.

    References: Tseng et al., "QuIP#", arXiv:2402.04396, Sec. 4 and Appendix (RVQ).
    """

    bits: int = 2
    vector_dim: int = dataclasses.field(default=8, init=False)

    def __post_init__(self):
        if self.bits not in (2, 3, 4):
            raise ValueError(f"E8P bits={self.bits!r}: expected 2, 3 or 4.")

    @property
    def name(self) -> str:
        return f"e8p{self.bits}"

    @property
    def _widths(self) -> tuple[int, ...]:
        return {2: (2,), 3: (2, 1), 4: (2, 2)}[self.bits]

    @property
    def code_bytes(self) -> int:
        return sum(self._widths)

    @property
    def code_bits_per_weight(self) -> float:
        return float(self.bits)

    @property
    def unit_scale(self) -> float:
        return e8p_lib.residual_gaussian_scale(self.bits)

    def encode(self, x, codebook, weights=None):
        del codebook, weights  # a fixed codebook; the search is the plain nearest point
        return words_to_bytes(e8p_lib.residual_encode(x, self.bits), self._widths)

    def decode(self, codes, codebook):
        del codebook
        words = bytes_to_words(codes, self._widths)
        return e8p_lib.residual_decode(words.astype(jnp.uint16), self.bits)

    def lookup(self, codes, codebook):
        del codebook
        words = bytes_to_words(codes, self._widths)
        out = []
        for s, table in enumerate(e8p_lib.residual_codebooks(self.bits)):
            bits = int(np.log2(table.shape[0]))
            idx = words[:, s].astype(jnp.uint8 if bits <= 8 else jnp.uint16)
            out.append((bits, idx, jnp.asarray(table, jnp.float32)))
        return out


@dataclasses.dataclass(frozen=True)
class PyramidVQ(VectorFormat):
    """Pyramid VQ: the direction of an n-vector as a point of ``P(n, K)`` (integers with L1 norm
    K, indexed by Fischer's enumeration, no stored codebook) and its gain on a
    ``2**gain_bits``-level Lloyd–Max codebook; one code ``gain_code · V(n, K) + index`` of
    ``ceil(log2(V · 2**gain_bits))`` bits, stored in whole bytes. The search is exact (and
    Hessian-weighted when the caller gives weights); ``code_bits_per_weight`` is the exact rate
    ``(log2 V + gain_bits) / n``. Served by table lookup when the code has at most 16 bits.

    References: van der Ouderaa et al., "Pyramid Vector Quantization for LLMs",
    arXiv:2410.16926; Fischer, "A pyramid vector quantizer", IEEE Trans. IT 32(4), 1986.
    """

    vector_dim: int
    pulses: int
    gain_bits: int = 1

    def __post_init__(self):
        self.check_dims()
        for field, lo in (("pulses", 1), ("gain_bits", 0)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"PyramidVQ {field}={v!r}: expected an int >= {lo}.")
        if self.gain_bits > 8:
            raise ValueError(f"PyramidVQ gain_bits={self.gain_bits}: expected at most 8.")
        if self.num_codes > 2**32:
            raise ValueError(
                f"PyramidVQ({self.vector_dim}, {self.pulses}, {self.gain_bits}): "
                f"V·2**gain_bits = {self.num_codes} codes do not fit a 32-bit code."
            )

    @property
    def name(self) -> str:
        return f"pvq_n{self.vector_dim}_k{self.pulses}_b{self.gain_bits}"

    @property
    def num_shapes(self) -> int:
        return pyramid_lib.pvq_count(self.vector_dim, self.pulses)

    @property
    def num_codes(self) -> int:
        return self.num_shapes * 2**self.gain_bits

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.num_codes)))

    @property
    def code_bytes(self) -> int:
        return -(-self.index_bits // 8)

    @property
    def code_bits_per_weight(self) -> float:
        return pyramid_lib.bits_per_weight(self.vector_dim, self.pulses, self.gain_bits)

    def encode(self, x, codebook, weights=None):
        del codebook
        n, k, gb = self.vector_dim, self.pulses, self.gain_bits
        x = x.astype(jnp.float32)
        levels = jnp.asarray(pyramid_lib.gain_codebook(n, k, gb))
        if weights is None:
            idx, gain = pyramid_lib.pvq_quantize(x, k, gb)
        else:
            wt = jnp.maximum(weights.astype(jnp.float32), 1e-12)
            y = pyramid_lib.pvq_nearest_weighted(x, k, wt).astype(jnp.float32)
            u = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
            g = jnp.sum(wt * x * u, axis=-1) / jnp.sum(wt * u * u, axis=-1)  # weighted best
            idx, gain = pyramid_lib.pvq_encode(y.astype(jnp.int32), k), None
            gain = pyramid_lib.quantize_gain(g, levels)
        word = gain.astype(jnp.uint32) * jnp.uint32(self.num_shapes) + idx.astype(jnp.uint32)
        return words_to_bytes(word[:, None], (self.code_bytes,))

    def _split(self, codes):
        word = bytes_to_words(codes, (self.code_bytes,))[:, 0]
        v = jnp.uint32(self.num_shapes)
        return word % v, (word // v).astype(jnp.uint8)

    def decode(self, codes, codebook):
        del codebook
        idx, gain = self._split(codes)
        n, k, gb = self.vector_dim, self.pulses, self.gain_bits
        return pyramid_lib.pvq_dequantize(idx, gain, n, k, gb)

    def lookup(self, codes, codebook):
        del codebook
        if not 2 <= self.vector_dim <= 8 or self.index_bits > 16:
            return None
        bits = max(4, self.index_bits)
        word = bytes_to_words(codes, (self.code_bytes,))[:, 0]
        table = _pvq_table(self.vector_dim, self.pulses, self.gain_bits, bits)
        return [(bits, word.astype(jnp.uint8 if bits <= 8 else jnp.uint16), jnp.asarray(table))]


@functools.cache
def _pvq_table(n: int, k: int, gain_bits: int, bits: int) -> np.ndarray:
    """f32 [2**bits, n]: the vector of every code ``gain · V + index`` (zero rows past the end)."""
    v = pyramid_lib.pvq_count(n, k)
    codes = np.arange(v * 2**gain_bits)
    with jax.ensure_compile_time_eval():  # a constant, also when first built under jit
        rows = pyramid_lib.pvq_dequantize(
            jnp.asarray(codes % v, jnp.uint32), jnp.asarray(codes // v, jnp.uint8), n, k, gain_bits
        )
    table = np.zeros((2**bits, n), np.float32)
    table[: codes.size] = np.asarray(rows)
    return table


@dataclasses.dataclass(frozen=True)
class Trellis(VectorFormat):
    """QTIP's bitshift trellis: ``length`` consecutive weights (the "vector") as exactly
    ``bits · length`` bits, each weight the 1MAD computed code of the last 16 bits of the
    stream (no codebook), chosen by tail-biting Viterbi (``trellis``). Not served by table
    lookup (a weight's value depends on a 16-bit sliding window): dequantize, then multiply.

    References: Tseng et al., "QTIP: Quantization with Trellises and Incoherence Processing",
    arXiv:2406.11235, Sec. 3-4.
    """

    bits: int = 2
    length: int = 256

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in range(1, 9):
            raise ValueError(f"Trellis bits={self.bits!r}: expected an int from 1 to 8.")
        t = self.length
        if isinstance(t, bool) or not isinstance(t, int) or t < 16 or (t * self.bits) % 16:
            raise ValueError(
                f"Trellis length={t!r}: expected an int >= 16 with length * bits a multiple of 16."
            )

    @property
    def vector_dim(self) -> int:
        return self.length

    @property
    def name(self) -> str:
        return f"trellis{self.bits}_t{self.length}"

    @property
    def code_bytes(self) -> int:
        return self.length * self.bits // 8

    @property
    def code_bits_per_weight(self) -> float:
        return float(self.bits)

    def encode(self, x, codebook, weights=None):
        del codebook, weights  # Viterbi minimizes the plain squared error
        stream = trellis_lib.encode(x.astype(jnp.float32), self.bits)  # uint16 [M, W]
        lo = (stream & 0xFF).astype(jnp.uint8)
        hi = (stream >> 8).astype(jnp.uint8)
        return jnp.stack([lo, hi], axis=-1).reshape(stream.shape[0], -1)

    def decode(self, codes, codebook):
        del codebook
        c = codes.astype(jnp.uint16).reshape(codes.shape[0], -1, 2)
        stream = c[..., 0] | (c[..., 1] << 8)
        return trellis_lib.decode(stream, self.bits, self.length)
