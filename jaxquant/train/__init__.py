"""jaxquant.train: meshes, logical-axis rules and the shardings of params and frozen QArrays.

``make_mesh(MeshConfig(...))`` builds the ``('data', 'fsdp', 'tensor')`` mesh;
``state_shardings(jax.eval_shape(model.init, ...), mesh, rules)`` gives the ``NamedSharding``s
for ``jax.jit(model.init, out_shardings=...)``, ``'quant'`` collections of QArrays included.
"""

from jaxquant.train.partitioning import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    logical_to_shardings,
    make_mesh,
    qarray_sharding,
    state_shardings,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "logical_to_shardings",
    "make_mesh",
    "qarray_sharding",
    "state_shardings",
]
