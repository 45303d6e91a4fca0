"""VectorQuantizer: a vector format with its scales, codebooks, rotation and QAT mode.

The ``Quantizer`` of vector quantization (``jaxquant.numerics.quantizer``): rules select it
like any preset, ``quantize`` makes a ``VQArray`` (nearest codes, or block LDLQ with a
Hessian: ``havq``), ``fake_quant`` trains through it (straight-through, or DKM's soft
assignment to a learned codebook).

Names: the format's name (``kmeans_d<d>_b<bits>``, ``e8p<bits>``, ``pvq_n<n>_k<K>_b<bits>``,
``trellis<bits>_t<T>``) then options, each printed only when not the default: ``rht``
(rotate), ``g<N>`` (group_size), ``cb<G>`` (codebook_groups), ``dkm`` (QAT), ``seed<S>``,
``norefit``, ``dkmt<temperature>``, ``dkmi<iters>``, and for k-means ``it<iters>``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp

from jaxquant.numerics.qarray import check_input
from jaxquant.numerics.quantizer import FLOAT_PATTERN, Quantizer
from jaxquant.vq import dkm as dkm_lib
from jaxquant.vq import vqarray as vqa
from jaxquant.vq.formats import E8P, KMeans, PyramidVQ, Trellis, VectorFormat
from jaxquant.vq.havq import havq

QAT_MODES = ("ste", "dkm")

# family pattern -> the format it builds from the pattern's groups.
_FORMATS = (
    (r"kmeans_d(\d+)_b(\d+)(?:_it(\d+))?", lambda d, b, it: KMeans(int(d), int(b), int(it or 100))),
    (r"e8p(\d)", lambda b: E8P(int(b))),
    (r"trellis(\d)_t(\d+)", lambda b, t: Trellis(int(b), int(t))),
    (r"pvq_n(\d+)_k(\d+)_b(\d+)", lambda n, k, b: PyramidVQ(int(n), int(k), int(b))),
)


def _format_name(fmt: VectorFormat) -> str:
    if isinstance(fmt, KMeans) and fmt.iters != 100:
        return f"{fmt.name}_it{fmt.iters}"
    return fmt.name


@dataclasses.dataclass(frozen=True)
class VectorQuantizer(Quantizer):
    """A vector-quantization recipe for a weight, accepted wherever rules take a quantizer.

    The weight is viewed as ``[K, N]`` (K: its contracted axis 0, N: the rest), optionally
    rotated (``rotate``: randomized Hadamard incoherence, ``rotation``), cut into vectors of
    ``format.vector_dim`` along K, divided by a per-group scale (one per ``group_size`` rows
    and output column; per column when None) and encoded.

    Attributes:
      format: a ``VectorFormat`` (``KMeans``, ``E8P``, ``PyramidVQ``, ``Trellis``).
      group_size: rows of K per scale, a multiple of ``format.vector_dim``; None: per column.
      codebook_groups: learned formats: one codebook per this many groups of output columns.
      rotate: randomized Hadamard incoherence (signs drawn from ``seed``).
      seed: seed of the rotation signs and of k-means' seeding.
      refit_scale: after encoding (RTN, not Hessian-aware), replace each scale by the
        least-squares one for its decoded group, which never raises the error.
      qat: ``'ste'`` (quantize-dequantize forward, straight-through gradient) or ``'dkm'``
        (differentiable k-means for learned formats: soft assignment to a learned codebook).
      dkm_temperature: DKM's softmax temperature, in unit-space squared distance.
      dkm_iters: DKM's soft k-means iterations per forward pass.

    Example:
      >>> q = quantize(w, VectorQuantizer(E8P(2), rotate=True))   # w: [K, N]; 2 bits + scales
      >>> VectorQuantizer(KMeans(4, 8), qat="dkm").name            # 'kmeans_d4_b8_dkm'
    """

    format: VectorFormat
    group_size: int | None = dataclasses.field(default=None, kw_only=True)
    codebook_groups: int = dataclasses.field(default=1, kw_only=True)
    rotate: bool = dataclasses.field(default=False, kw_only=True)
    seed: int = dataclasses.field(default=0, kw_only=True)
    refit_scale: bool = dataclasses.field(default=True, kw_only=True)
    qat: str = dataclasses.field(default="ste", kw_only=True)
    dkm_temperature: float = dataclasses.field(default=0.05, kw_only=True)
    dkm_iters: int = dataclasses.field(default=1, kw_only=True)

    hessian_method = "havq"
    activations = False
    FAMILIES = ("kmeans_d<d>_b<bits>", "e8p<bits>", "pvq_n<n>_k<K>_b<bits>", "trellis<bits>_t<T>")

    def __post_init__(self):
        if not isinstance(self.format, VectorFormat):
            raise TypeError(f"VectorQuantizer format={self.format!r}: expected a VectorFormat.")
        d = self.format.vector_dim
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1 or g % d):
            raise ValueError(
                f"VectorQuantizer group_size={g!r}: expected None or a positive multiple of the "
                f"format's vector_dim={d}."
            )
        cg = self.codebook_groups
        if isinstance(cg, bool) or not isinstance(cg, int) or cg < 1:
            raise ValueError(f"VectorQuantizer codebook_groups={cg!r}: expected an int >= 1.")
        if cg > 1 and not self.format.learned:
            raise ValueError(
                f"VectorQuantizer codebook_groups={cg}: {self.format.name} has a fixed codebook; "
                "only learned formats (KMeans) fit one per group of columns."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"VectorQuantizer seed={self.seed!r}: expected an int >= 0.")
        if self.qat not in QAT_MODES:
            raise ValueError(f"VectorQuantizer qat={self.qat!r}: expected one of {QAT_MODES}.")
        if self.qat == "dkm" and not self.format.learned:
            raise ValueError(
                f"VectorQuantizer qat='dkm' needs a learned codebook (KMeans), not "
                f"{self.format.name}."
            )
        if self.qat == "dkm" and self.rotate:
            raise ValueError(
                "VectorQuantizer qat='dkm' with rotate=True: DKM trains unrotated weights."
            )
        if not self.dkm_temperature > 0:
            raise ValueError(
                f"VectorQuantizer dkm_temperature={self.dkm_temperature!r}: expected > 0."
            )
        it = self.dkm_iters
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"VectorQuantizer dkm_iters={it!r}: expected an int >= 0.")

    # -- names --------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        parts = [_format_name(self.format)]
        if self.rotate:
            parts.append("rht")
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if self.codebook_groups > 1:
            parts.append(f"cb{self.codebook_groups}")
        if self.qat == "dkm":
            parts.append("dkm")
        if self.seed:
            parts.append(f"seed{self.seed}")
        if not self.refit_scale:
            parts.append("norefit")
        if self.dkm_temperature != 0.05:
            parts.append(f"dkmt{float(self.dkm_temperature)!r}")
        if self.dkm_iters != 1:
            parts.append(f"dkmi{self.dkm_iters}")
        return "_".join(parts)

    @classmethod
    def from_name(cls, name: str) -> VectorQuantizer | None:
        name = name.lower()
        matches = ((re.match(p + r"(?=_|$)", name), build) for p, build in _FORMATS)
        m, build = next(((m, b) for m, b in matches if m is not None), (None, None))
        if m is None:
            return None
        fmt = build(*m.groups())
        kw: dict = {}
        rest = name[m.end() :]
        for token in rest.split("_")[1:] if rest else ():
            if token == "rht":
                kw["rotate"] = True
            elif token == "dkm":
                kw["qat"] = "dkm"
            elif token == "norefit":
                kw["refit_scale"] = False
            elif re.fullmatch(r"g\d+", token):
                kw["group_size"] = int(token[1:])
            elif re.fullmatch(r"cb\d+", token):
                kw["codebook_groups"] = int(token[2:])
            elif re.fullmatch(r"seed\d+", token):
                kw["seed"] = int(token[4:])
            elif re.fullmatch("dkmt" + FLOAT_PATTERN, token):
                kw["dkm_temperature"] = float(token[4:])
            elif re.fullmatch(r"dkmi\d+", token):
                kw["dkm_iters"] = int(token[4:])
            else:
                raise ValueError(
                    f"quantizer name {name!r}: unknown option {token!r} for {fmt.name} (options: "
                    "rht, g<N>, cb<G>, dkm, seed<S>, norefit, dkmt<temperature>, dkmi<iters>"
                    + (
                        ", and it<iters> right after the k-means format)."
                        if isinstance(fmt, KMeans)
                        else ")."
                    )
                )
        return cls(fmt, **kw)

    # -- the protocol -------------------------------------------------------------------------

    def with_group_size(self, group_size: int | None) -> VectorQuantizer:
        return dataclasses.replace(self, group_size=group_size)

    def check_shape(self, shape, axis=None) -> None:
        """A weight ``[K, *rest]`` contracted over axis 0 whose K the vectors and groups divide
        and whose columns the codebook groups divide."""
        shape = tuple(shape)
        if axis not in (None, 0, (0,)):
            raise ValueError(
                f"{self.name}: vector quantization contracts axis 0 of a weight [K, *rest] "
                f"(layers merge consecutive contracted axes into it), got axis={axis!r}."
            )
        if len(shape) < 2:
            raise ValueError(f"{self.name}: expected a weight [K, *rest], got shape {shape}.")
        k, n = shape[0], math.prod(shape[1:])
        d = self.format.vector_dim
        if k % d:
            raise ValueError(
                f"{self.name}: the contracted size K={k} is not a multiple of the format's "
                f"vector_dim={d}."
            )
        if self.group_size is not None and k % self.group_size:
            raise ValueError(f"{self.name}: group_size={self.group_size} does not divide K={k}.")
        if n % self.codebook_groups:
            raise ValueError(
                f"{self.name}: codebook_groups={self.codebook_groups} does not divide the {n} "
                "output columns."
            )

    def _codebook(self, learned) -> jax.Array | None:
        if not learned:
            return None
        extra = set(learned) - {"codebook"}
        if extra or not self.format.learned:
            raise ValueError(
                f"{self.name}: learned={sorted(learned)}: only learned formats (KMeans) take a "
                "'codebook'."
            )
        codebook = jnp.asarray(learned["codebook"], jnp.float32)
        fmt = self.format
        expected = (self.codebook_groups, fmt.num_codewords, fmt.vector_dim)
        if tuple(codebook.shape) != expected:
            raise ValueError(
                f"{self.name}: learned codebook: expected f32 {expected}, got "
                f"{tuple(codebook.shape)}."
            )
        return codebook

    def quantize(
        self, x, *, axis=None, hessian=None, learned=None, key=None, damp=0.01, order=None
    ):
        """``x`` ``[K, *rest]`` as a ``VQArray``: each vector's nearest code, or block LDLQ
        (``havq``) given the Hessian ``[K, K]`` of its inputs.

        Args:
          x: float ``[K, *rest]``, contracted over axis 0.
          axis: None or 0.
          hessian: f32 ``[K, K]``: Hessian-aware VQ instead of nearest codes.
          learned: ``{'codebook': [G, C, d]}`` (learned formats): encode with this codebook
            instead of fitting one; with ``qat='dkm'`` it is DKM's, refined by its soft
            k-means steps on ``x`` first.
          key: unused (vector codes round to nearest).
          damp: the Hessian's relative damping.
          order: must be None (block LDLQ runs in input order).
        """
        del key
        x = check_input(x, f"{self.name} x")
        self.check_shape(x.shape, axis)
        codebook = self._codebook(learned)
        if order is not None:
            raise ValueError(
                f"{self.name}: order={order!r} is a GPTQ option; vector quantization runs in "
                "input order."
            )
        if hessian is not None:
            if codebook is not None:
                raise ValueError(f"{self.name}: Hessian-aware VQ fits its own codebook.")
            k = x.shape[0]
            q = havq(x.reshape(k, -1), hessian, self, damp=damp)
            return q.replace(shape=tuple(x.shape), dtype=x.dtype)
        if codebook is not None and self.qat == "dkm":
            codebook = _dkm_final_codebook(x, codebook, quantizer=self)
        return vqa.encode_weight(x, None, codebook, quantizer=self)

    def fake_quant(self, x, *, axis=None, learned=None, key=None) -> jax.Array:
        """Quantize-dequantize: the value of ``quantize(x).dequantize()`` with a straight-through
        gradient (``d out / d x = 1``), or with ``qat='dkm'`` and ``learned={'codebook': ...}``
        DKM's soft assignment, differentiable in ``x`` and the codebook."""
        del key
        x = check_input(x, f"{self.name} x")
        self.check_shape(x.shape, axis)
        codebook = self._codebook(learned)
        if self.qat == "dkm":
            if codebook is None:
                raise ValueError(
                    f"{self.name}: DKM needs its learned codebook: learned={{'codebook': ...}} "
                    "(init_learned gives the initial one)."
                )
            x2, full = _unit_space(x, self)
            return (_dkm_matrix(x2, codebook, self) * full).reshape(x.shape).astype(x.dtype)
        xs = jax.lax.stop_gradient(x)
        wq = jax.lax.stop_gradient(self.quantize(xs, learned=learned).dequantize())
        return wq + (x - xs)

    @property
    def learned_names(self) -> tuple[str, ...]:
        return ("codebook",) if self.qat == "dkm" else ()

    def init_learned(self, x, *, axis=None) -> dict[str, jax.Array]:
        """``{'codebook': k-means codebooks [G, C, d] of x's unit-space vectors}`` with
        ``qat='dkm'``, else ``{}``."""
        if self.qat != "dkm":
            return {}
        x = check_input(x, f"{self.name} x")
        self.check_shape(x.shape, axis)
        x2, _ = _unit_space(jax.lax.stop_gradient(x), self)
        return {"codebook": vqa.fit_codebook(x2, self, jax.random.key(self.seed))}


def _unit_space(x, quantizer: VectorQuantizer):
    """(unit-space matrix [K, N], full scale [K, N]): scales from the current weights, no
    gradient through them (DKM trains the direction, not the scale)."""
    w2 = vqa.as_matrix(x)
    scale = jax.lax.stop_gradient(vqa.group_rms_scale(w2, quantizer))
    full = vqa.expand_scale(scale, w2.shape[0], quantizer.group_size or w2.shape[0])
    return w2 / full, full


def _per_codebook_group(x2, codebook, quantizer: VectorQuantizer, fn) -> list:
    """``fn(vectors [M_c, d], codebook[c])`` for each codebook group c of the columns."""
    d = quantizer.format.vector_dim
    v = vqa.vectors(x2, d)
    cols = v.shape[1] // quantizer.codebook_groups
    return [
        fn(v[:, c * cols : (c + 1) * cols].reshape(-1, d), codebook[c])
        for c in range(quantizer.codebook_groups)
    ]


def _dkm_matrix(x2, codebook, quantizer: VectorQuantizer) -> jax.Array:
    """DKM's soft-quantized unit-space matrix [K, N] (``dkm.dkm_fake_quant`` on its vectors,
    one codebook [C, d] per codebook group), differentiable in ``x2`` and ``codebook``."""
    d = quantizer.format.vector_dim
    nv = x2.shape[0] // d
    parts = _per_codebook_group(
        x2,
        codebook,
        quantizer,
        lambda v, cb: dkm_lib.dkm_fake_quant(
            v, cb, temperature=quantizer.dkm_temperature, iters=quantizer.dkm_iters
        ).reshape(nv, -1, d),
    )
    return vqa.from_vectors(jnp.concatenate(parts, axis=1))


@functools.partial(jax.jit, static_argnames=("quantizer",))
def _dkm_final_codebook(x, codebook, *, quantizer: VectorQuantizer) -> jax.Array:
    """[G, C, d]: the codebooks after DKM's soft k-means iterations on ``x`` (what the frozen
    weight's vectors are assigned to)."""
    x2, _ = _unit_space(x, quantizer)
    return jnp.stack(
        _per_codebook_group(
            x2,
            codebook,
            quantizer,
            lambda v, cb: dkm_lib.dkm_codebook(
                v, cb, temperature=quantizer.dkm_temperature, iters=quantizer.dkm_iters
            ),
        )
    )
