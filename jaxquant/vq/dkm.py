"""Differentiable k-means (DKM) for training vector-quantized weights, with a memory-lean backward.

Terminology:
  w_vec:        the weight cut into M vectors of dimension d: [M, d].
  codebook:     c codewords (centroids) ``C``: [c, d].
  attention:    ``A_ij = softmax_j(−‖w_i − C_j‖² / temperature)``: the soft assignment of vector
                i to codeword j, [M, c]. Rows sum to 1.
  DKM step:     one soft k-means update ``C_j ← Σ_i A_ij w_i / Σ_i A_ij``, after which the
                attention is recomputed from the new codebook. A codeword no vector attends to
                (column sum 0, e.g. by underflow) is kept unchanged.
  iters:        how many DKM steps run before the output ``w̃ = A C`` (with the last ``C``).
  chunk:        rows of ``w_vec`` handled at once. The lean path never holds more than
                O(chunk · c) of attention, forward or backward: it saves only ``w_vec``, the
                ``iters + 1`` codebooks and the column sums, and recomputes attention chunk by
                chunk in the backward pass. (eDKM, Sec. 3, keeps the attention but offloads it,
                compressed, to host memory; recomputing needs no host transfers.)
  uniquification:
                attention depends on ``w_i`` only through its value, so for d = 1 and a 16-bit
                (or narrower) float weight it is computed once per distinct value (at most
                2^16 of them: a static bound) and gathered by a per-row index (eDKM, Sec. 3).
                It pays off when M is well above 2^bits, as in LLM layers.

Squared distances use the matmul form ``‖w‖² − 2 w·C + ‖C‖²`` clamped at 0 (the clamp passes
no gradient), matmuls run at ``Precision.HIGHEST`` (the form cancels badly in bf16/tf32), and
the softmax subtracts the row maximum. Everything is computed in float32 (float64 for float64
inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _sq_dist(p: jax.Array, codebook: jax.Array) -> jax.Array:
    """Clamped squared distances [n, c] between rows of ``p`` [n, d] and ``codebook`` [c, d]."""
    pp = jnp.sum(p * p, axis=-1, keepdims=True)
    cc = jnp.sum(codebook * codebook, axis=-1)
    dist = pp - 2 * _dot(p, codebook.T) + cc
    # `where`, not `maximum`: the gradient is exactly 0 at a clamped (or zero) distance.
    return jnp.where(dist > 0, dist, 0)


def _attention(p, codebook, temperature):
    """(A, dist), both [n, c]."""
    dist = _sq_dist(p, codebook)
    return jax.nn.softmax(-dist / temperature, axis=-1), dist


def _kmeans_update(s, n, codebook):
    """``S / n`` per codeword, keeping a codeword whose column sum ``n`` is 0."""
    alive = (n > 0)[:, None]
    # Double `where`: no 0/0 in the untaken branch, so no NaN in its gradient either.
    return jnp.where(alive, s / jnp.where(alive, n[:, None], 1), codebook)


def _compute_dtype(w_vec, codebook):
    # Not jnp.result_type: 8-bit floats have no implicit promotion path.
    return jnp.float64 if jnp.float64 in (w_vec.dtype, codebook.dtype) else jnp.float32


def _check_args(fn, w_vec, codebook, temperature=1.0, iters=0, chunk=1):
    w_vec, codebook = jnp.asarray(w_vec), jnp.asarray(codebook)
    if w_vec.ndim != 2 or w_vec.shape[0] == 0 or w_vec.shape[1] == 0:
        raise ValueError(f"{fn} w_vec: expected a non-empty [M, d] array, got shape {w_vec.shape}.")
    if not jnp.issubdtype(w_vec.dtype, jnp.floating):
        raise ValueError(f"{fn} w_vec: expected a float array, got {w_vec.dtype}.")
    if codebook.ndim != 2 or codebook.shape[0] == 0 or codebook.shape[1] != w_vec.shape[1]:
        raise ValueError(
            f"{fn} codebook: expected shape [c, {w_vec.shape[1]}] (c >= 1, d as in w_vec "
            f"{w_vec.shape}), got {codebook.shape}."
        )
    if not jnp.issubdtype(codebook.dtype, jnp.floating):
        raise ValueError(f"{fn} codebook: expected a float array, got {codebook.dtype}.")
    if not isinstance(temperature, jax.core.Tracer):
        t = np.asarray(temperature)
        if t.shape != () or not np.isfinite(t) or not t > 0:
            raise ValueError(f"{fn} temperature: expected a finite scalar > 0, got {temperature}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{fn} iters: expected an int >= 0, got {iters!r}.")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{fn} chunk: expected an int >= 1, got {chunk!r}.")
    dtype = _compute_dtype(w_vec, codebook)
    return w_vec, codebook.astype(dtype), jnp.asarray(temperature, dtype)


def _unique_size(fn, w_vec, unique):
    """Static bound on the distinct values of ``w_vec`` for uniquification, or None."""
    if not unique:
        return None
    if w_vec.shape[1] != 1 or jnp.dtype(w_vec.dtype).itemsize > 2:
        raise ValueError(
            f"{fn} unique: needs d == 1 and a float dtype of at most 16 bits (bf16, f16, fp8), "
            f"which bounds the distinct values by 2^bits; got shape {w_vec.shape}, dtype "
            f"{w_vec.dtype}. Cast the weight (e.g. to bfloat16) or pass unique=False."
        )
    return min(w_vec.shape[0], 2 ** (8 * jnp.dtype(w_vec.dtype).itemsize))


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _by_chunk(x: jax.Array, chunk: int) -> jax.Array:
    return x.reshape(-1, chunk, *x.shape[1:])


# The lean path works on weighted points: `p` [N, d] with multiplicities `m` [N]. Plain mode:
# the rows of w_vec padded to a multiple of the chunk, m = 1 on real rows and 0 on padding.
# Unique mode: the distinct values, m = their counts (0 on fill entries), and `inv` [M] maps
# rows back to points. N is a multiple of `chunk`.


def _points(w, unique_size, chunk):
    if unique_size is None:
        m = jnp.ones(w.shape[0], w.dtype)
        p, inv = w, None
    else:
        u, inv, counts = jnp.unique(
            w[:, 0], size=unique_size, return_inverse=True, return_counts=True
        )
        p, m = u[:, None], counts.astype(w.dtype)
        # A 16-bit row map, as in eDKM, whenever the distinct values fit.
        inv = inv.reshape(-1).astype(jnp.uint16 if unique_size <= 2**16 else jnp.int32)
    chunk = min(chunk, p.shape[0])
    rows = -(-p.shape[0] // chunk) * chunk
    return _pad_rows(p, rows), _pad_rows(m, rows), inv, chunk


def _dkm_step_lean(p, m, codebook, temperature, chunk):
    """One DKM step over chunks of points: (new codebook [c, d], column sums [c])."""

    def body(carry, xs):
        s, n = carry
        pc, mc = xs
        a = _attention(pc, codebook, temperature)[0] * mc[:, None]  # [chunk, c]
        return (s + _dot(a.T, pc), n + jnp.sum(a, axis=0)), None

    init = (jnp.zeros_like(codebook), jnp.zeros(codebook.shape[:1], codebook.dtype))
    (s, n), _ = jax.lax.scan(body, init, (_by_chunk(p, chunk), _by_chunk(m, chunk)))
    return _kmeans_update(s, n, codebook), n


def _soft_output_lean(p, codebook, temperature, chunk):
    """``A C`` for every point, chunk by chunk: [N, d]."""

    def body(_, pc):
        return None, _dot(_attention(pc, codebook, temperature)[0], codebook)

    _, out = jax.lax.scan(body, None, _by_chunk(p, chunk))
    return out.reshape(p.shape)


def _attention_vjp(pc, rc, codebook, temperature, a, dist, da):
    """Pulls ``dA`` [chunk, c] back through ``A = softmax(−dist/τ)`` and the distances.

    Returns the gradient per copy of each point [chunk, d], and the ``rc``-weighted sums of the
    gradients w.r.t. the codebook [c, d] and the temperature [].
    """
    dz = a * (da - jnp.sum(a * da, axis=-1, keepdims=True))
    ddist = jnp.where(dist > 0, -dz / temperature, 0)
    dp = 2 * pc * jnp.sum(ddist, axis=-1, keepdims=True) - 2 * _dot(ddist, codebook)
    ddist_r = ddist * rc[:, None]
    dc = 2 * codebook * jnp.sum(ddist_r, axis=0)[:, None] - 2 * _dot(ddist_r.T, pc)
    # Σ_j dz_ij = 0, so shifting each row's distances by its minimum changes nothing but the
    # rounding: it drops the common part that would multiply the rounding residual of Σ_j dz_ij.
    shifted = dist - jnp.min(dist, axis=-1, keepdims=True)
    dt = jnp.sum(rc[:, None] * dz * shifted) / temperature**2
    return dp, dc, dt


def _output_vjp_lean(p, r, g, codebook, temperature, chunk):
    """VJP of ``A C`` with cotangent ``g`` [N, d] per point, reductions weighted by ``r``."""

    def body(carry, xs):
        dc_acc, dt_acc = carry
        pc, rc, gc = xs
        a, dist = _attention(pc, codebook, temperature)
        dp, dc, dt = _attention_vjp(pc, rc, codebook, temperature, a, dist, _dot(gc, codebook.T))
        dc = dc + _dot((a * rc[:, None]).T, gc)
        return (dc_acc + dc, dt_acc + dt), dp

    init = (jnp.zeros_like(codebook), jnp.zeros((), codebook.dtype))
    xs = (_by_chunk(p, chunk), _by_chunk(r, chunk), _by_chunk(g, chunk))
    (dc, dt), dp = jax.lax.scan(body, init, xs)
    return dp.reshape(p.shape), dc, dt


def _dkm_step_vjp_lean(p, m, codebook, new_codebook, n, ct, temperature, chunk):
    """VJP of one DKM step w.r.t. points (per copy), old codebook and temperature."""
    alive = (n > 0)[:, None]
    n_safe = jnp.where(alive, n[:, None], 1)
    ds = jnp.where(alive, ct / n_safe, 0)  # [c, d]
    dn = jnp.where(alive[:, 0], -jnp.sum(ct * new_codebook, axis=-1) / n_safe[:, 0], 0)  # [c]

    def body(carry, xs):
        dc_acc, dt_acc = carry
        pc, mc = xs
        a, dist = _attention(pc, codebook, temperature)
        da = _dot(pc, ds.T) + dn  # [chunk, c]
        dp, dc, dt = _attention_vjp(pc, mc, codebook, temperature, a, dist, da)
        return (dc_acc + dc, dt_acc + dt), dp + _dot(a, ds)

    init = (jnp.where(alive, 0, ct), jnp.zeros((), codebook.dtype))  # dead codewords pass ct
    (dc, dt), dp = jax.lax.scan(body, init, (_by_chunk(p, chunk), _by_chunk(m, chunk)))
    return dp.reshape(p.shape), dc, dt


def _dkm_lean_fwd(w, codebook, temperature, iters, chunk, unique_size, output):
    p, m, inv, chunk = _points(w.astype(codebook.dtype), unique_size, chunk)

    def step(cb, _):
        new_cb, n = _dkm_step_lean(p, m, cb, temperature, chunk)
        return new_cb, (new_cb, n)

    # A scan over the steps, not a Python loop: the compiled size does not grow with iters.
    last, (later, colsums) = jax.lax.scan(step, codebook, length=iters)
    codebooks = jnp.concatenate([codebook[None], later])  # [iters + 1, c, d]
    if output:
        result = _soft_output_lean(p, last, temperature, chunk)
        result = result[: w.shape[0]] if inv is None else result[inv]
    else:
        result = last
    # Residuals, O(M·d + iters·c·d): no [M, c] array. Plain mode keeps w itself, in its own
    # dtype (alive anyway as the parameter), and casts and pads it again in the backward pass;
    # unique mode keeps the points and the row map.
    points = (w, None) if inv is None else (None, (p, m, inv))
    return result, (points, codebooks, colsums, temperature)


def _dkm_lean_bwd(iters, chunk, unique_size, output, res, ct):
    (w, uniq), codebooks, colsums, temperature = res
    if uniq is None:
        p, m, inv, chunk = _points(w.astype(temperature.dtype), None, chunk)
    else:
        (p, m, inv), chunk = uniq, min(chunk, uniq[0].shape[0])
    if not output:
        dp_out, dc, dt = None, ct, jnp.zeros((), temperature.dtype)
    elif inv is None:
        dp_out, dc, dt = _output_vjp_lean(
            p, m, _pad_rows(ct, p.shape[0]), codebooks[-1], temperature, chunk
        )
    else:
        # d == 1: the pullback is linear in each row's cotangent, so run it with g = 1 per
        # distinct value and weight the codebook/temperature sums by the summed cotangents.
        r = _pad_rows(jax.ops.segment_sum(ct[:, 0], inv, num_segments=unique_size), p.shape[0])
        dp_out, dc, dt = _output_vjp_lean(p, r, jnp.ones_like(p), codebooks[-1], temperature, chunk)

    def step_back(carry, xs):
        dp_acc, dc, dt = carry
        cb, new_cb, n = xs
        dp, dc, dt_step = _dkm_step_vjp_lean(p, m, cb, new_cb, n, dc, temperature, chunk)
        return (dp_acc + dp, dc, dt + dt_step), None

    xs = (codebooks[:-1], codebooks[1:], colsums)
    init = (jnp.zeros_like(p), dc, dt)
    (dp_iters, dc, dt), _ = jax.lax.scan(step_back, init, xs, reverse=True)
    if inv is None:
        dw = dp_iters if dp_out is None else dp_iters + dp_out
        dw = dw[: w.shape[0]].astype(w.dtype)
    else:
        dw = dp_iters[inv] if dp_out is None else ct * dp_out[inv] + dp_iters[inv]
    return dw, dc, dt


def _lean_input(w_vec, unique_size, dtype):
    # Plain mode: w_vec in its own dtype, saved as is (a bf16 weight is not kept again in f32).
    # Unique mode saves no copy of w_vec, so cast it outside and let autodiff cast back.
    return w_vec if unique_size is None else w_vec.astype(dtype)


def _dkm_lean_primal(w, codebook, temperature, iters, chunk, unique_size, output):
    return _dkm_lean_fwd(w, codebook, temperature, iters, chunk, unique_size, output)[0]


_dkm_lean = jax.custom_vjp(_dkm_lean_primal, nondiff_argnums=(3, 4, 5, 6))
_dkm_lean.defvjp(_dkm_lean_fwd, _dkm_lean_bwd)


def dkm_fake_quant(
    w_vec: jax.Array,
    codebook: jax.Array,
    *,
    temperature: float | jax.Array,
    iters: int = 1,
    chunk: int = 4096,
    unique: bool = False,
) -> jax.Array:
    """DKM soft quantization of ``w_vec`` onto ``codebook``, differentiable, memory-lean.

    With ``C⁰ = codebook``, ``iters`` DKM steps and the output (DKM, Sec. 3.2, Fig. 2)::

        A⁽ᵗ⁾_ij = softmax_j(−‖w_i − Cᵗ_j‖² / τ),   Cᵗ⁺¹_j = Σ_i A⁽ᵗ⁾_ij w_i / Σ_i A⁽ᵗ⁾_ij,
        w̃_i = Σ_j A⁽ᵀ⁾_ij Cᵀ_j   (T = iters).

    Gradients reach ``w_vec`` (through every attention and every update), ``codebook`` (through
    all the updates) and ``temperature``. Values and gradients equal ``dkm_reference``'s to
    rounding, but a ``jax.custom_vjp`` saves only ``w_vec``, the T + 1 codebooks and the column
    sums, and recomputes attention ``chunk`` rows at a time in the backward pass: live memory is
    O(chunk · c) instead of the O(T · M · c) that plain autodiff keeps.

    Args:
      w_vec: float [M, d] (any float dtype; computed in float32).
      codebook: float [c, d].
      temperature: τ > 0, a scalar (a traced one is allowed, e.g. an annealed schedule; it
        gets a gradient too). The scale of squared distances; see ``temperature_from_spread``.
      iters: DKM steps before the output (≥ 0; 0 means a fixed codebook).
      chunk: rows per block; the attention blocks are [chunk, c] (≈ 4 · chunk · c bytes
        each, a few alive at a time). Lower it for large c.
      unique: uniquification (eDKM): compute attention once per distinct value and gather.
        Needs d == 1 and ``w_vec`` in a float type of at most 16 bits (bf16, f16, fp8), which
        bounds the distinct values statically (min(M, 2^bits)); then the work and memory scale
        with that bound instead of M, and the residuals are a uint16 row map instead of
        ``w_vec``. A float32 weight has no such bound (``jnp.unique(size=...)`` would silently
        drop values past the size), hence the dtype requirement: cast first.

    Returns:
      float32 [M, d] (float64 for float64 inputs): ``w̃``.

    Example:
      >>> w = jnp.array([[0.1], [0.2], [0.9], [1.1]])
      >>> dkm_fake_quant(w, jnp.array([[0.0], [1.0]]), temperature=0.01, iters=3).ravel()
      Array([0.15, 0.15, 1.  , 1.  ], dtype=float32)

    References:
      Cho et al., "DKM: Differentiable K-Means Clustering Layer for Neural Network
      Compression", ICLR 2022, arXiv:2108.12659, Sec. 3.2. Cho et al., "eDKM: An Efficient and
      Accurate Train-time Weight Clustering for Large Language Models", arXiv:2309.00964, Sec. 3.
    """
    fn = "dkm_fake_quant"
    w_vec, codebook, temperature = _check_args(fn, w_vec, codebook, temperature, iters, chunk)
    unique_size = _unique_size(fn, w_vec, unique)
    return _dkm_lean(
        _lean_input(w_vec, unique_size, codebook.dtype),
        codebook,
        temperature,
        iters,
        chunk,
        unique_size,
        True,
    )


def dkm_codebook(
    w_vec: jax.Array,
    codebook: jax.Array,
    *,
    temperature: float | jax.Array,
    iters: int = 1,
    chunk: int = 4096,
    unique: bool = False,
) -> jax.Array:
    """The codebook ``Cᵀ`` after ``iters`` DKM steps: what freezing assigns weights to.

    The same steps (and lean gradients) as ``dkm_fake_quant``, without the output pass. At
    freeze time ``hard_assign(w_vec, dkm_codebook(...))`` gives the codes, and the served
    weight ``Cᵀ[codes]`` is the training-time output ``A Cᵀ`` with each attention row made
    one-hot on its largest entry.

    Args:
      w_vec, codebook, temperature, iters, chunk, unique: as in ``dkm_fake_quant``.

    Returns:
      float32 [c, d] (float64 for float64 inputs).

    References:
      arXiv:2108.12659, Sec. 3.2.
    """
    fn = "dkm_codebook"
    w_vec, codebook, temperature = _check_args(fn, w_vec, codebook, temperature, iters, chunk)
    unique_size = _unique_size(fn, w_vec, unique)
    return _dkm_lean(
        _lean_input(w_vec, unique_size, codebook.dtype),
        codebook,
        temperature,
        iters,
        chunk,
        unique_size,
        False,
    )


def dkm_reference(
    w_vec: jax.Array,
    codebook: jax.Array,
    *,
    temperature: float | jax.Array,
    iters: int = 1,
) -> jax.Array:
    """``dkm_fake_quant`` written plainly with ``jnp`` and differentiated by autodiff.

    Same math, dtype and numerics (clamped matmul-form distances, max-subtracted softmax, dead
    codewords kept), no chunking: autodiff saves several [M, c] arrays per step. For tests and
    small problems.

    Args:
      w_vec, codebook, temperature, iters: as in ``dkm_fake_quant``.

    Returns:
      float32 [M, d] (float64 for float64 inputs).
    """
    fn = "dkm_reference"
    w_vec, codebook, temperature = _check_args(fn, w_vec, codebook, temperature, iters)
    w = w_vec.astype(codebook.dtype)
    for _ in range(iters):
        a = _attention(w, codebook, temperature)[0]
        codebook = _kmeans_update(_dot(a.T, w), jnp.sum(a, axis=0), codebook)
    return _dot(_attention(w, codebook, temperature)[0], codebook)


def _nearest(w, codebook, chunk, k):
    """The k smallest squared distances [M, k] and their indices [M, k], chunk by chunk."""
    w = w.astype(codebook.dtype)
    chunk = min(chunk, w.shape[0])
    rows = -(-w.shape[0] // chunk) * chunk
    cc = jnp.sum(codebook * codebook, axis=-1)

    def body(_, pc):
        # ‖p‖² is constant per row: rank by ‖C‖² − 2 p·C, add it back for the distances.
        neg, idx = jax.lax.top_k(2 * _dot(pc, codebook.T) - cc, k)
        return None, (jnp.maximum(jnp.sum(pc * pc, axis=-1, keepdims=True) - neg, 0), idx)

    _, (dist, idx) = jax.lax.scan(body, None, _by_chunk(_pad_rows(w, rows), chunk))
    return dist.reshape(rows, k)[: w.shape[0]], idx.reshape(rows, k)[: w.shape[0]]


def hard_assign(w_vec: jax.Array, codebook: jax.Array, *, chunk: int = 4096) -> jax.Array:
    """Index of the nearest codeword to each row: ``argmin_j ‖w_i − C_j‖²``, int32 [M].

    Distances in the matmul form ``‖C_j‖² − 2 w_i·C_j`` (``‖w_i‖²`` does not change the
    argmin), ``chunk`` rows at a time, so memory is O(chunk · c). Ties go to the lower index.

    Args:
      w_vec: float [M, d].
      codebook: float [c, d].
      chunk: rows per block.

    Returns:
      int32 [M]: codes; ``codebook[codes]`` is the hard quantization of ``w_vec``.

    Example:
      >>> hard_assign(jnp.array([[0.2], [0.9], [-3.0]]), jnp.array([[0.0], [1.0]]))
      Array([0, 1, 0], dtype=int32)
    """
    w_vec, codebook, _ = _check_args("hard_assign", w_vec, codebook, chunk=chunk)
    return _nearest(w_vec, codebook, chunk, 1)[1][:, 0].astype(jnp.int32)


def temperature_from_spread(
    w_vec: jax.Array, codebook: jax.Array, scale: float, *, chunk: int = 4096
) -> jax.Array:
    """A temperature relative to the data: ``scale`` × the median nearest-codeword margin.

    DKM treats τ as a hyper-parameter tuned per model (coremltools' DKM palettizer takes it as
    a fixed ``palett_tau``); an absolute value does not carry across weight scales, codebook
    sizes or d, and here τ divides squared distances, so it has the units of a squared weight.
    The attention of
    ``w_i`` on its runner-up codeword relative to its nearest one is ``exp(−δ_i / τ)`` with the
    margin ``δ_i = ‖w_i − C₂‖² − ‖w_i − C₁‖²`` (second minus first smallest squared distance),
    so with ::

        τ = scale · median_i δ_i

    half of the vectors weigh their runner-up by at most ``exp(−1/scale)``: ``scale = 1`` is
    soft (0.37), ``scale = 0.1`` nearly hard away from cell boundaries (4.5e-5). In 1-D with
    uniform spacing Δ the median margin is ≈ Δ²/2. This is this library's heuristic, not the
    papers'.

    Args:
      w_vec: float [M, d].
      codebook: float [c, d], c ≥ 2.
      scale: > 0.
      chunk: rows per block of the distance computation.

    Returns:
      float32 scalar (at least the smallest normal float, so it is always a valid τ).

    Example:
      >>> w = jnp.linspace(-0.5, 0.5, 1001)[:, None]
      >>> temperature_from_spread(w, jnp.array([[-0.5], [0.5]]), 1.0)   # Δ²/2, Δ = 1
      Array(0.5, dtype=float32)

    References:
      arXiv:2108.12659, Sec. 3.2 (τ in the attention softmax).
    """
    fn = "temperature_from_spread"
    w_vec, codebook, _ = _check_args(fn, w_vec, codebook, chunk=chunk)
    if codebook.shape[0] < 2:
        raise ValueError(f"{fn} codebook: needs at least 2 codewords, got {codebook.shape[0]}.")
    if not np.isfinite(scale) or not scale > 0:
        raise ValueError(f"{fn} scale: expected a finite float > 0, got {scale}.")
    dist = _nearest(w_vec, codebook, chunk, 2)[0]
    t = scale * jnp.median(dist[:, 1] - dist[:, 0])
    return jnp.maximum(t, jnp.finfo(t.dtype).tiny)
