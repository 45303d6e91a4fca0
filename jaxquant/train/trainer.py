"""The Trainer: a sharded, checkpointed training loop for the Llama decoder, and the evaluation
of its float and quantized variants. ``train_and_evaluate(config, workdir)`` is what
``train.py`` and the Colabs call.

Terminology:
  global batch: ``config.train.batch_size`` sequences per step over all processes; each process
                reads its own slice (``BatchIterator``) and the slices form one global array
                sharded over the mesh's ('data', 'fsdp') axes.
  microbatch:   with ``grad_accum_steps = k`` the global batch is split into k parts whose
                gradients are averaged in one jitted step (same update as one big batch).
  state:        ``TrainState(step, params, opt_state)``, jitted with explicit shardings and
                donated to each step; checkpointed by orbax with the data iterator's position.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct, traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant import numerics, optim
from jaxquant.data import BatchIterator, get_tokenizer, load_text
from jaxquant.models import Llama, LlamaConfig, load_pretrained
from jaxquant.nn import QuantConfig, QuantRule, partitioning
from jaxquant.numerics import training as training_lib
from jaxquant.train import evaluator as evaluator_lib
from jaxquant.train import metrics as metrics_lib

# QAT recipes selectable by name from a config (``config.quant.qat``).
QAT_RECIPES: dict[str, tuple[QuantRule, ...]] = {
    "": (),
    "int8": (QuantRule(".*", weight=numerics.INT8, act=numerics.INT8),),
    "int4": (QuantRule(".*", weight=numerics.INT4),),
}


def train_rules(name: str, num_layers: int) -> tuple[QuantRule, ...]:
    """The rules of ``config.quant.train``: every linear layer trains with the recipe
    (``numerics.training``); NVFP4 keeps the last eighth of the blocks (at least one, unless
    the model has only one) in high precision, as its paper keeps the last blocks in BF16.
    Embeddings, the head and the attention products (not layers) stay in float under every
    recipe."""
    if not name:
        return ()
    recipe = training_lib.get_training_recipe(name)
    rules = []
    if recipe.name == "nvfp4":
        keep = max(1, round(num_layers / 8)) if num_layers > 1 else 0
        if keep:
            last = "|".join(str(i) for i in range(num_layers - keep, num_layers))
            rules.append(QuantRule(rf"(^|/)layers_({last})/"))
    rules.append(QuantRule(".*", train=recipe))
    return tuple(rules)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: dict
    opt_state: optax.OptState
    # a delayed-scaling recipe's amax histories (the '_overwrite_with_gradient' collection):
    # replaced by their gradient each step, not stepped by the optimizer
    overwrite: dict = struct.field(default_factory=dict)


OPTIMIZERS = ("adamw", "lion", "sgd", "shampoo")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
AVERAGING = ("", "ema", "lawa")


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """``config.optim.schedule``: ``'cosine'`` (linear warmup, cosine decay to
    ``lr * final_lr_ratio`` at ``num_steps``), or the horizon-free ``'inverse_sqrt'`` and
    ``'constant'`` (linear warmup, then ``lr·sqrt(warmup/t)`` or ``lr``; pair them with
    ``config.optim.averaging``)."""
    o = cfg.optim
    kind = o.get("schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=o.lr,
            warmup_steps=o.warmup_steps,
            decay_steps=max(cfg.train.num_steps, o.warmup_steps + 1),
            end_value=o.lr * o.final_lr_ratio,
        )
    if kind == "inverse_sqrt":
        return optim.inverse_sqrt_schedule(o.lr, o.warmup_steps)
    if kind == "constant":
        return optim.constant_schedule(o.lr, o.warmup_steps)
    raise ValueError(f"config.optim.schedule={kind!r}: expected one of {SCHEDULES}.")


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clip, then the optimizer ``config.optim.name`` on ``make_schedule``.

    ``config.optim``: ``name`` (``OPTIMIZERS``); ``state_bits`` (32, 8 or 4; Shampoo 32 or 4)
    with ``state_format`` (``''``: the default for the bits; 8: ``dynamic``/``e4m3``; 4:
    ``rank1``/``factorized``/``rank1_dynamic``) and ``state_rounding`` (``''``: the recipe's
    default, ``nearest``/``stochastic``), see
    ``jaxquant.optim``; Shampoo's ``shampoo_statistics_interval`` and
    ``shampoo_preconditioner_interval`` (steps between Kronecker-statistics updates and between
    inverse roots) and ``shampoo_moment_bits`` (its Adam moments: 32, 8 or 4); ``averaging``
    (``''``, ``ema``: half-life ``ema_half_life_fraction · t``, ``lawa``: the last ``lawa_k``
    snapshots every ``lawa_every`` steps), whose averaged weights the evaluator reports next
    to the last iterate. f32 AdamW is ``optax.adamw`` itself.
    """
    o = cfg.optim
    schedule = make_schedule(cfg)
    name = o.get("name", "adamw")
    bits = o.get("state_bits", 32)
    fmt = o.get("state_format", "") or None
    rounding = o.get("state_rounding", "") or None
    q = dict(state_bits=bits, state_format=fmt, rounding=rounding)
    if name == "adamw":
        kw = dict(b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
        if bits == 32 and fmt is None:
            base = optax.adamw(schedule, **kw)
        else:
            base = optim.adamw(schedule, **kw, **q)
    elif name == "lion":
        base = optim.lion(
            schedule, b1=o.b1, b2=o.get("lion_b2", 0.99), weight_decay=o.weight_decay, **q
        )
    elif name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(o.weight_decay),
            optim.sgd(schedule, momentum=o.get("momentum", 0.9), **q),
        )
    elif name == "shampoo":
        if fmt is not None or rounding is not None:
            raise ValueError(
                "config.optim.name='shampoo' takes state_bits (32 or 4) only, not state_format "
                f"({fmt!r}) or state_rounding ({rounding!r})."
            )
        base = optim.shampoo(
            schedule,
            b1=o.b1,
            b2=o.b2,
            weight_decay=o.weight_decay,
            state_bits=bits,
            statistics_interval=o.get("shampoo_statistics_interval", 10),
            preconditioner_interval=o.get("shampoo_preconditioner_interval", 10),
            moment_bits=o.get("shampoo_moment_bits", 32),
        )
    else:
        raise ValueError(f"config.optim.name={name!r}: expected one of {OPTIMIZERS}.")
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), base)
    averaging = o.get("averaging", "")
    if averaging == "ema":
        tx = optim.with_averaging(tx, optim.ema_growing(o.get("ema_half_life_fraction", 0.04)))
    elif averaging == "lawa":
        tx = optim.with_averaging(tx, optim.lawa(o.get("lawa_k", 5), o.get("lawa_every", 100)))
    elif averaging:
        raise ValueError(f"config.optim.averaging={averaging!r}: expected one of {AVERAGING}.")
    return tx


def _loss_fn(model: nn.Module, params, overwrite, inputs, targets, key):
    variables = {"params": params}
    if overwrite:
        variables[training_lib.OVERWRITE_COLLECTION] = overwrite
    logits = model.apply(variables, inputs, rngs={training_lib.RNG_STREAM: key})
    nats, count = evaluator_lib.cross_entropy(logits, targets, jnp.ones(targets.shape))
    return nats / count


def train_step(state: TrainState, batch, *, model, optimizer, grad_accum_steps: int, seed: int = 0):
    """One optimizer step on a global batch, gradients averaged over ``grad_accum_steps``.

    A training recipe's random numbers come from ``fold_in(key(seed), step)`` (one key per
    microbatch), so a resumed run draws what an uninterrupted one does. Delayed-scaling amax
    histories (``state.overwrite``) take their gradient, the updated history, as their next
    value: the elementwise max over microbatches (each rolled the same history)."""
    inputs, targets = batch["inputs"], batch["targets"]
    micro = inputs.shape[0] // grad_accum_steps
    split = lambda x: x.reshape(grad_accum_steps, micro, *x.shape[1:])  # noqa: E731
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model), argnums=(0, 1))
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)

    def accumulate(carry, mb):
        loss_sum, grad_sum, overwrite = carry
        key = jax.random.fold_in(step_key, mb[2])
        loss, (grads, new) = grad_fn(state.params, state.overwrite, mb[0], mb[1], key)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        overwrite = jax.tree.map(jnp.maximum, overwrite, new)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), overwrite), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    no_amax = jax.tree.map(jnp.zeros_like, state.overwrite)
    (loss, grads, overwrite), _ = jax.lax.scan(
        accumulate,
        (jnp.zeros((), jnp.float32), zeros, no_amax),
        (split(inputs), split(targets), jnp.arange(grad_accum_steps)),
    )
    loss, grads = loss / grad_accum_steps, jax.tree.map(lambda g: g / grad_accum_steps, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, overwrite=overwrite
    )
    return new_state, metrics


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> LlamaConfig:
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    kw = {k: v for k, v in cfg.model.to_dict().items() if k in fields}
    unknown = set(cfg.model.to_dict()) - fields - {"pretrained"}
    if unknown:
        raise ValueError(
            f"config.model has unknown fields {sorted(unknown)}; known: {sorted(fields)}."
        )
    return LlamaConfig(**{**kw, "vocab_size": vocab_size})


class Trainer:
    """Builds the mesh, model, optimizer and data from a config; trains with checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike):
        self.config = config
        self.workdir = os.fspath(workdir)
        c = config
        if c.train.batch_size % c.train.grad_accum_steps:
            raise ValueError(
                f"config.train.batch_size={c.train.batch_size} must be a multiple of "
                f"config.train.grad_accum_steps={c.train.grad_accum_steps}."
            )
        if c.quant.qat not in QAT_RECIPES:
            raise ValueError(
                f"config.quant.qat={c.quant.qat!r}: expected one of {list(QAT_RECIPES)}."
            )
        train_recipe = c.quant.get("train", "")
        if train_recipe and train_recipe not in training_lib.TRAINING_RECIPES:
            raise ValueError(
                f"config.quant.train={train_recipe!r}: expected '' or one of "
                f"{list(training_lib.TRAINING_RECIPES)}."
            )
        if train_recipe and c.quant.qat:
            raise ValueError(
                f"config.quant.qat={c.quant.qat!r} and config.quant.train={train_recipe!r}: "
                "a training recipe quantizes the forward pass itself; set one of them."
            )
        self.mesh = partitioning.make_mesh(partitioning.MeshConfig(**c.mesh.to_dict()))
        train_text = load_text("train", c.data.path or None)
        valid_text = load_text("validation", c.data.path or None)
        self.pretrained_params = None
        pretrained = c.model.get("pretrained", "")
        if pretrained:
            # the checkpoint decides the architecture and the tokenizer
            model, self.pretrained_params, self.tokenizer = load_pretrained(
                pretrained, dtype=c.model.dtype, mesh=self.mesh
            )
            if self.tokenizer is None:
                raise ValueError(
                    f"config.model.pretrained={pretrained!r} has no tokenizer: training and "
                    "evaluation need one to encode the corpus."
                )
            self.model_config = model.config
        else:
            spm = c.data.tokenizer == "sentencepiece"
            self.tokenizer = get_tokenizer(
                c.data.tokenizer,
                vocab_size=c.data.vocab_size or None,
                model_path=os.path.join(self.workdir, "tokenizer.model") if spm else None,
                train_text=train_text if spm else None,
            )
        self.train_tokens = self.tokenizer.encode(train_text)
        self.valid_tokens = self.tokenizer.encode(valid_text)
        self.bytes_per_token = self.tokenizer.bytes_per_token(valid_text)
        if not pretrained:
            self.model_config = model_config(c, self.tokenizer.vocab_size)
        rules = QAT_RECIPES[c.quant.qat] or train_rules(train_recipe, self.model_config.num_layers)
        self.float_model = Llama(self.model_config)
        self.model = (
            Llama(self.model_config, QuantConfig(mode="qat", rules=rules))
            if rules
            else self.float_model
        )
        self.optimizer = make_optimizer(c)
        self.data = BatchIterator(
            self.train_tokens, batch_size=c.train.batch_size, seq_len=c.train.seq_len, seed=c.seed
        )
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp"), None))
        self._build()

    def _build(self):
        c = self.config
        sample = jnp.zeros((1, c.train.seq_len), jnp.int32)
        key = jax.random.key(c.seed)
        abstract = jax.eval_shape(self.model.init, key, sample)
        param_shardings = partitioning.state_shardings(abstract, self.mesh)["params"]

        def init(key, pretrained=None):
            variables = nn.unbox(self.model.init(key, sample))
            params = variables["params"]
            overwrite = variables.get(training_lib.OVERWRITE_COLLECTION, {})
            if pretrained is not None:  # the loaded weights; a QAT model's own quantizer
                flat = traverse_util.flatten_dict(params)  # params (if any) keep their init
                flat.update(traverse_util.flatten_dict(pretrained))
                params = traverse_util.unflatten_dict(flat)
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=self.optimizer.init(params),
                overwrite=overwrite,
            )

        abstract_state = jax.eval_shape(init, key)
        opt_shardings = _opt_state_shardings(
            abstract_state.opt_state, abstract_state.params, param_shardings, self.mesh
        )
        replicated = NamedSharding(self.mesh, P())
        self.state_shardings = TrainState(
            step=replicated,
            params=param_shardings,
            opt_state=opt_shardings,
            overwrite=jax.tree.map(lambda _: replicated, abstract_state.overwrite),
        )
        self._init = jax.jit(init, out_shardings=self.state_shardings)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            self.state_shardings,
        )
        step = functools.partial(
            train_step,
            model=self.model,
            optimizer=self.optimizer,
            grad_accum_steps=c.train.grad_accum_steps,
            seed=c.seed,
        )
        batch_shardings = {"inputs": self.batch_sharding, "targets": self.batch_sharding}
        self._step = jax.jit(
            step,
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )

    def init_state(self) -> TrainState:
        """A fresh state: initialized params, or the pretrained ones (config.model.pretrained)."""
        key = jax.random.key(self.config.seed)
        if self.pretrained_params is None:
            return self._init(key)
        return self._init(key, self.pretrained_params)

    def initial_params(self, manager: ocp.CheckpointManager, mode: str):
        """``(params, step)``: the float params ``--mode=eval|ptq|generate`` works on, the latest
        checkpoint of the workdir and its step, else the pretrained weights and step 0; without
        either, a ValueError."""
        if manager.latest_step() is None and self.pretrained_params is None:
            raise ValueError(
                f"--mode={mode}: no checkpoint in "
                f"{os.path.join(self.workdir, 'checkpoints')} and no config.model.pretrained; "
                "train first or name a pretrained model."
            )
        if manager.latest_step() is None:
            return self.pretrained_params, 0
        state = self.restore_or_init(manager)
        return state.params, int(state.step)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's slice of the batch, as one global array sharded over the mesh."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()
        }

    def step(self, state: TrainState, local_batch) -> tuple[TrainState, dict]:
        return self._step(state, self.global_batch(local_batch))

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        c = self.config.train
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep_checkpoints,
            save_interval_steps=c.checkpoint_every,
            enable_async_checkpointing=True,
        )
        return ocp.CheckpointManager(
            os.path.abspath(os.path.join(self.workdir, "checkpoints")), options=options
        )

    def restore_or_init(self, manager: ocp.CheckpointManager) -> TrainState:
        """The latest checkpoint (state and data position), or a fresh state."""
        step = manager.latest_step()
        if step is None:
            return self.init_state()
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(self.abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        self.data.restore(restored["data"])
        return restored["state"]

    def save(self, manager, state: TrainState, *, force: bool = False) -> bool:
        """Saves per the manager's interval (always with ``force``); True if it saved."""
        step = int(state.step)
        if force and step in manager.all_steps():
            return False
        return manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(self.data.state())
            ),
            force=force,
        )

    def train(self, *, stop_at: int | None = None) -> tuple[TrainState, list[float]]:
        """Trains to ``config.train.num_steps`` (or ``stop_at``), resuming from the workdir.

        Returns the final state and the losses of the steps run in this call.
        """
        c = self.config.train
        last = c.num_steps if stop_at is None else min(stop_at, c.num_steps)
        tokens_per_step = c.batch_size * c.seq_len
        losses = []
        with (
            self.checkpoint_manager() as manager,
            metrics_lib.MetricWriter(
                self.workdir,
                total_steps=c.num_steps,
                enabled=jax.process_index() == 0,
                log_every=c.log_every,
            ) as writer,
        ):
            state = self.restore_or_init(manager)
            start = int(state.step)
            if start:
                writer.log(f"resumed from step {start} in {self.workdir}")
            logged = start
            for step in range(start, last):
                state, metrics = self.step(state, next(self.data))
                if (step + 1) % c.log_every == 0 or step + 1 == last:
                    m = jax.device_get(metrics)
                    writer.write_scalars(step + 1, {f"train/{k}": v for k, v in m.items()})
                    tokens = tokens_per_step * (step + 1 - logged)
                    writer.progress(step + 1, loss=float(m["loss"]), tokens=tokens)
                    logged = step + 1
                losses.append(metrics["loss"])  # read back once, at the end
                self.save(manager, state)
            self.save(manager, state, force=True)
            manager.wait_until_finished()
        return state, [float(x) for x in losses]

    def evaluator(self) -> evaluator_lib.Evaluator:
        c = self.config
        return evaluator_lib.Evaluator(
            self.float_model,
            self.valid_tokens,
            batch_size=c.eval.batch_size,
            seq_len=c.train.seq_len,
            bytes_per_token=self.bytes_per_token,
            max_batches=c.eval.max_batches or None,
        )

    def evaluate(self, params, overwrite=None) -> list[evaluator_lib.EvalResult]:
        """Float, every variant of ``config.eval.variants`` frozen with RTN, and, after QAT,
        the QAT recipe itself frozen and served (``qat_int8``: weights and activations); after
        training with a recipe (``config.quant.train``), the model with the recipe's quantized
        forward pass (its amax histories ``overwrite`` for delayed scaling)."""
        variants = evaluator_lib.default_variants()
        names = [v for v in self.config.eval.variants.split(",") if v]
        unknown = [n for n in names if n not in variants]
        if unknown:
            raise ValueError(f"config.eval.variants: unknown {unknown}; known: {list(variants)}.")
        chosen = {n: variants[n] for n in names}
        if self.config.quant.qat:
            chosen[f"qat_{self.config.quant.qat}"] = QAT_RECIPES[self.config.quant.qat]
        evaluator = self.evaluator()
        results = evaluator.compare(params, chosen)
        recipe = self.config.quant.get("train", "")
        if recipe:
            variables = {"params": nn.unbox(params)}
            if overwrite:
                variables[training_lib.OVERWRITE_COLLECTION] = overwrite
            result = evaluator.evaluate(variables, model=self.model, name=f"{recipe} forward")
            results.insert(1, result)
        return results


def _opt_state_shardings(opt_state, params, param_shardings, mesh):
    """Optimizer leaves shaped like a param whose path ends their own (Adam's f32 moments,
    averaged weights) take its sharding. Other leaves of at least ``mesh.size`` · 64 elements
    whose leading axis the mesh's device count divides (quantized moments' flat codes and
    block scales, rank-1 maxima) are split along that axis over every device, ZeRO-style; the
    rest (counts, small leaves) is replicated."""
    replicated = NamedSharding(mesh, P())
    spread = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    by_path = {
        tuple(str(k) for k in path): (np.shape(leaf), sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }

    def sharding_of(path, leaf):
        keys = tuple(str(k) for k in path)
        shape = np.shape(leaf)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        if shape and shape[0] % mesh.size == 0 and np.prod(shape) >= 64 * mesh.size:
            return spread
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Trains (resuming from ``workdir``), then prints the float-vs-quantized table."""
    trainer = Trainer(config, workdir)
    state, _ = trainer.train()
    results = trainer.evaluate(state.params, state.overwrite)
    if config.optim.get("averaging", ""):
        averaged = optim.averaged_params(state.opt_state)
        name = f"float ({config.optim.averaging} average)"
        results.insert(1, trainer.evaluator().evaluate({"params": averaged}, name=name))
    if jax.process_index() == 0:
        print(evaluator_lib.format_table(results))
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Evaluates the latest checkpoint of ``workdir`` (else ``config.model.pretrained``) and
    prints the evaluation table."""
    trainer = Trainer(config, workdir)
    with trainer.checkpoint_manager() as manager:
        params, _ = trainer.initial_params(manager, "eval")
        overwrite = None
        if manager.latest_step() is not None:
            overwrite = trainer.restore_or_init(manager).overwrite
    results = trainer.evaluate(params, overwrite)
    if jax.process_index() == 0:
        print(evaluator_lib.format_table(results))
    return results


GENERATE_DEFAULTS = {
    "prompt": "The capital of France is",
    "chat": False,  # wrap the prompt in the tokenizer's chat template (instruct models)
    "max_new_tokens": 64,
    "temperature": 0.0,  # 0: greedy
    "top_k": 0,
    "top_p": 1.0,
    "seed": 0,
    "kv_cache": "bfloat16",  # float32 | bfloat16 | int8 | int4 | none
    "quant": "",  # '' (float) or a quantizer name: RTN-frozen weights, served by the kernels
}


def generate_text(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """``--mode=generate``: continues ``config.generate.prompt`` with the latest checkpoint of
    ``workdir`` (else ``config.model.pretrained``); prints the text, tokens/s and cache bytes.

    Returns the ``jaxquant.models.Generation``.
    """
    from jaxquant.models import generate
    from jaxquant.nn import freeze, serving_params

    g = {**GENERATE_DEFAULTS, **(config.generate.to_dict() if "generate" in config else {})}
    unknown = set(g) - set(GENERATE_DEFAULTS)
    if unknown:
        raise ValueError(
            f"config.generate has unknown fields {sorted(unknown)}; known: "
            f"{sorted(GENERATE_DEFAULTS)}."
        )
    trainer = Trainer(config, workdir)
    with trainer.checkpoint_manager() as manager:
        params, _ = trainer.initial_params(manager, "generate")
    tokenizer = trainer.tokenizer
    prompt = g["prompt"]
    if g["chat"]:
        prompt = tokenizer.chat([{"role": "user", "content": prompt}])
    model, variables, name = trainer.float_model, {"params": nn.unbox(params)}, "float"
    if g["quant"]:
        rules = (QuantRule(".*", weight=numerics.get_quantizer(g["quant"])),)
        sample = jnp.asarray(tokenizer.encode(prompt)[None, : config.train.seq_len])
        quant, _ = freeze(model, variables["params"], sample, rules=rules)
        model = model.clone(quant=QuantConfig(mode="serve", rules=rules))
        variables = {"params": serving_params(variables["params"], quant), "quant": quant}
        name = f"{g['quant']} (RTN, served)"
    out = generate(
        model,
        variables,
        [prompt],
        max_new_tokens=g["max_new_tokens"],
        tokenizer=tokenizer,
        temperature=g["temperature"],
        top_k=g["top_k"],
        top_p=g["top_p"],
        seed=g["seed"],
        kv_cache=g["kv_cache"],
    )
    if jax.process_index() == 0:
        print(prompt + out.text[0])
        print(
            f"\n[{name} weights, {g['kv_cache']} KV cache: {len(out.tokens[0])} tokens; prefill "
            f"{out.prefill_seconds:.3f} s; decode {out.decode_tokens_per_second:.1f} tokens/s; "
            f"cache {out.cache_bytes:,} bytes]"
        )
    return out
