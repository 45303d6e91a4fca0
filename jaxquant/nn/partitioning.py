"""Device meshes, logical-axis rules, and the shardings of params and frozen weights.

Terminology:
  mesh axes:     ``data`` (batch only), ``fsdp`` (batch and params: fully sharded data
                 parallel), ``tensor`` (params' output features and heads: tensor parallel).
  logical axes:  the names a model gives its params' dimensions (``embed``, ``mlp``, ``heads``,
                 ``kv_heads``, ``head_dim``, ``vocab``, ``norm``) and activations (``batch``).
  rules:         ``(logical_name, mesh_axis | tuple of mesh axes | None)`` pairs, Flax's
                 ``nn.logical_to_mesh_axes`` format; the first rule naming a logical axis wins.

Sharding is data: the model states its logical axes, the config states the rules and the mesh
shape, and ``state_shardings(jax.eval_shape(model.init, ...), mesh, rules)`` gives the
``NamedSharding``s for ``jax.jit(model.init, out_shardings=...)``. A dimension that its mesh axes
do not divide is replicated (with a warning naming the param) rather than failing inside XLA.

Frozen weights (the ``'quant'`` collection) are sharded like the float weight they replace:
each quantized tensor's ``shardings(weight_sharding)`` derives the sharding of its codes,
scales (and zero points, codebooks) from the weight's, so a device holds the codes of its
weight shard together with their scales.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.numerics import is_quantized
from jaxquant.numerics.qarray import mesh_axis_size

MESH_AXES = ("data", "fsdp", "tensor")

# Params are sharded over fsdp on their model dimension and over tensor on their feature / head
# / vocab dimension; the batch over data x fsdp. head_dim and norm scales stay whole: they are
# small, and head_dim is the axis RoPE splits in two.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The mesh shape: devices along ``data``, ``fsdp`` and ``tensor``.

    One size may be ``-1``: all the devices the other two leave.

    Attributes:
      data: data-parallel size (batch sharded, params replicated).
      fsdp: fully-sharded data-parallel size (batch and params sharded).
      tensor: tensor-parallel size (features and heads sharded).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(
                    f"MeshConfig {name}={v!r}: expected a positive int, or -1 for all the "
                    "remaining devices."
                )
        wild = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(wild) > 1:
            raise ValueError(
                f"MeshConfig {', '.join(f'{n}=-1' for n in wild)}: at most one size may be -1."
            )

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) sizes for ``num_devices`` devices, ``-1`` resolved."""
        sizes = [getattr(self, name) for name in MESH_AXES]
        fixed = math.prod(s for s in sizes if s != -1)
        desc = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True))
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig {desc}: the fixed sizes multiply to {fixed}, which does not "
                    f"divide the {num_devices} devices."
                )
            sizes = [num_devices // fixed if s == -1 else s for s in sizes]
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig {desc}: the sizes multiply to {fixed}, but there are "
                f"{num_devices} devices."
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'fsdp', 'tensor')`` over ``devices`` (default: all).

    The axes are ``AxisType.Auto``: ordinary jit code runs unchanged, the compiler propagates
    shardings from the ``in_shardings``/``out_shardings`` it is given.

    Example:
      >>> mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))   # on 8 devices
      >>> mesh.shape                                               # {'data': 2, 'fsdp': 2, ...}
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _fit(mesh: Mesh, entry, n: int):
    """The longest prefix of ``entry``'s mesh axes whose size divides ``n`` (None if none)."""
    names = entry if isinstance(entry, tuple) else (entry,)
    for k in range(len(names), 0, -1):
        if n % mesh_axis_size(mesh, names[:k]) == 0:
            return names[0] if k == 1 else names[:k]
    return None


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def logical_to_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES, *, shapes=None):
    """Maps a pytree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh``.

    Args:
      logical_specs: a pytree whose leaves are ``PartitionSpec``s of logical axis names, e.g.
        ``nn.get_partition_spec(jax.eval_shape(model.init, ...))``.
      mesh: the device mesh.
      rules: logical-axis rules (``DEFAULT_RULES``).
      shapes: a pytree matching ``logical_specs`` of arrays or ``ShapeDtypeStruct``s. When given,
        a dimension that its mesh axes do not divide keeps the longest prefix of those axes that
        does, or is replicated, with one warning per param naming it; without it, no check.

    Returns:
      The pytree of ``NamedSharding``s, the structure of ``logical_specs``.
    """

    def one(path, spec, shape=None):
        mesh_spec = list(nn.logical_to_mesh_axes(spec, rules))
        if shape is None:
            return NamedSharding(mesh, P(*mesh_spec))
        dims = tuple(shape.shape)
        mesh_spec += [None] * (len(dims) - len(mesh_spec))
        fixed = []
        for d, (n, entry) in enumerate(zip(dims, mesh_spec, strict=True)):
            if entry is not None and n % mesh_axis_size(mesh, entry):
                mesh_spec[d] = _fit(mesh, entry, n)
                fixed.append(f"dim {d} (size {n}, {spec[d]!r} -> {entry!r})")
        if fixed:
            fallbacks.append(
                f"{_path_str(path)}: shape {dims}: {'; '.join(fixed)} not divisible by the mesh "
                f"axes {dict(mesh.shape)}; using {P(*mesh_spec)} instead."
            )
        return NamedSharding(mesh, P(*mesh_spec))

    fallbacks = []
    trees = (logical_specs,) if shapes is None else (logical_specs, shapes)
    out = jax.tree_util.tree_map_with_path(one, *trees, is_leaf=_is_spec)
    for message in fallbacks:  # one warning per param, at the caller's line
        warnings.warn(message, stacklevel=2)
    return out


def _view_sharding(weight: NamedSharding, shape, view_shape) -> NamedSharding:
    """The weight's sharding carried to its quantization view (``jaxquant.nn.ops.weight_view``:
    consecutive contracting axes merged into one). A merged axis keeps the mesh axes of its first
    part when the other parts are unsharded (each shard is then a contiguous block of rows), and
    is replicated otherwise."""
    if shape == view_shape:
        return weight
    spec = list(weight.spec) + [None] * (len(shape) - len(weight.spec))
    first = next(i for i, (a, b) in enumerate(zip(shape, view_shape, strict=False)) if a != b)
    width = len(shape) - len(view_shape) + 1
    merged = spec[first] if all(e is None for e in spec[first + 1 : first + width]) else None
    new = spec[:first] + [merged] + spec[first + width :]
    return NamedSharding(weight.mesh, P(*new))


def state_shardings(abstract_variables, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings for a Flax model's unboxed variables, from its abstract boxed variables.

    Args:
      abstract_variables: ``jax.eval_shape(model.init, ...)`` (params boxed with
        ``nn.with_logical_partitioning``), possibly with a ``'quant'`` collection of (abstract)
        quantized tensors mirroring ``'params'``, as ``jaxquant.nn.freeze`` makes.
      mesh: the device mesh.
      rules: logical-axis rules (``DEFAULT_RULES``).

    Returns:
      The pytree of ``NamedSharding``s for ``nn.unbox(variables)``: every collection by its
      logical specs (unannotated leaves replicated); each ``'quant'`` tensor by its
      ``shardings`` from the sharding of the param at the same path (replicated when there is
      none, e.g. after ``serving_params`` dropped it).

    Example:
      >>> abstract = jax.eval_shape(model.init, key, tokens)
      >>> shardings = state_shardings(abstract, mesh)
      >>> variables = jax.jit(model.init, out_shardings=shardings)(key, tokens)
    """
    variables = dict(abstract_variables)
    quant = variables.pop("quant", None)
    specs = nn.get_partition_spec(variables)
    out = logical_to_shardings(specs, mesh, rules, shapes=nn.unbox(variables))
    if quant is None:
        return out
    replicated = NamedSharding(mesh, P())
    flat_params = traverse_util.flatten_dict(out.get("params", {}), sep="/")
    param_shapes = traverse_util.flatten_dict(nn.unbox(variables).get("params", {}), sep="/")
    flat_quant = traverse_util.flatten_dict(
        nn.unbox(quant), sep="/", is_leaf=lambda _, x: is_quantized(x)
    )
    flat_out = {}
    for path, q in flat_quant.items():
        if not is_quantized(q):
            flat_out[path] = replicated
            continue
        weight = flat_params.get(path)
        if weight is not None and path in param_shapes:
            weight = _view_sharding(weight, tuple(param_shapes[path].shape), tuple(q.shape))
        if weight is None or len(weight.spec) > len(q.shape):
            weight = replicated
        flat_out[path] = q.shardings(weight)
    out["quant"] = traverse_util.unflatten_dict(flat_out, sep="/") if flat_out else {}
    return out
