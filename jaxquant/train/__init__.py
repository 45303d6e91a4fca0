"""jaxquant.train: the sharded trainer, the evaluator, metrics, meshes and logical-axis rules.

``train_and_evaluate(config, workdir)`` trains a model from a config (``configs/*.py``), resuming
from ``workdir``, and prints the float-vs-quantized table; ``train.py`` is a thin absl entry to
it. ``make_mesh(MeshConfig(...))`` builds the ``('data', 'fsdp', 'tensor')`` mesh;
``state_shardings(jax.eval_shape(model.init, ...), mesh, rules)`` gives the ``NamedSharding``s
for ``jax.jit(model.init, out_shardings=...)``, ``'quant'`` collections of quantized tensors
included.
"""

from jaxquant.nn.partitioning import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    logical_to_shardings,
    make_mesh,
    state_shardings,
)
from jaxquant.train.evaluator import (
    EvalResult,
    Evaluator,
    cross_entropy,
    default_variants,
    format_table,
)
from jaxquant.train.metrics import MetricWriter, format_eta, read_scalars
from jaxquant.train.trainer import (
    QAT_RECIPES,
    Trainer,
    TrainState,
    evaluate_checkpoint,
    train_and_evaluate,
    train_rules,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "QAT_RECIPES",
    "EvalResult",
    "Evaluator",
    "MeshConfig",
    "MetricWriter",
    "TrainState",
    "Trainer",
    "cross_entropy",
    "default_variants",
    "evaluate_checkpoint",
    "format_eta",
    "format_table",
    "logical_to_shardings",
    "make_mesh",
    "read_scalars",
    "state_shardings",
    "train_and_evaluate",
    "train_rules",
]
