"""``train.py --mode=ptq``: quantize a trained checkpoint, save it, report.

For each quantizer of ``config.ptq.format`` the latest checkpoint of ``workdir`` is quantized
by round-to-nearest (``freeze``) and (with ``config.ptq.method='hessian'``) from the Hessians
of calibration inputs (``quantize_model``: GPTQ for scalar formats, block LDLQ for vector ones),
layer-sequentially on ``config.ptq.num_calibration_batches`` training batches; every variant is
evaluated on the validation split and its 'quant' collection saved under
``workdir/ptq/<method>_<format>`` (method ``rtn``, ``gptq`` or ``havq``).

Config fields (``config.ptq``):
  method:                   ``'hessian'`` (prints RTN too, as the baseline) or ``'rtn'``.
  format:                   comma-separated quantizer names (``jaxquant.get_quantizer``):
                            ``int4_g64``, ``mxfp4``, ``nf4``, ``e8p2_rht``, ...
  group_size:               0 keeps each quantizer's grouping; N > 0 groups N inputs.
  num_calibration_batches:  batches of ``config.train`` shape drawn from the training split.
  damp:                     the Hessian's relative damping.
  order:                    GPTQ's row order: '' (input order), 'act' or 'babai'.
"""

from __future__ import annotations

import json
import os
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxquant.data import BatchIterator
from jaxquant.nn import QuantRule, WeightReport, freeze
from jaxquant.numerics import get_quantizer
from jaxquant.ptq import quantize_model
from jaxquant.train import evaluator as evaluator_lib
from jaxquant.train import metrics as metrics_lib
from jaxquant.train.trainer import Trainer

_BAR_WIDTH = 20


def ptq_rules(fmt: str, group_size: int = 0) -> tuple[QuantRule, ...]:
    """Weight-only rules for every linear layer: the quantizer named ``fmt``
    (``get_quantizer``: ``'int4_g64'``, ``'mxfp4'``, ``'e8p2_rht'``), regrouped to
    ``group_size`` inputs when it is not 0."""
    quantizer = get_quantizer(fmt)
    if group_size:
        quantizer = quantizer.with_group_size(group_size)
    return (QuantRule(".*", weight=quantizer),)


def calibration_batches(trainer: Trainer, num_batches: int) -> list[np.ndarray]:
    """``num_batches`` training batches (inputs only), a fixed draw independent of training's."""
    c = trainer.config
    if num_batches < 1:
        raise ValueError(f"config.ptq.num_calibration_batches={num_batches}: expected >= 1.")
    it = BatchIterator(
        trainer.train_tokens,
        batch_size=c.train.batch_size,
        seq_len=c.train.seq_len,
        seed=c.seed + 1,
        process_index=0,
        process_count=1,
    )
    return [np.asarray(next(it)["inputs"]) for _ in range(num_batches)]


class _LayerBar:
    """``ptq gptq INT4_G128 [#####-----] 12/42 layers_1/mlp/up/kernel err 0.0123 (rtn 0.0345)``
    on one updated line when stdout is a terminal, else every quarter of the layers."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stdout
        self.tty = metrics_lib.isatty(self.stream)

    def __call__(self, done: int, total: int, r: WeightReport):
        filled = round(_BAR_WIDTH * done / total)
        line = (
            f"ptq {self.label} [{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {done}/{total} "
            f"{r.path} err {r.error:.4f} (rtn {r.rtn_error:.4f})"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if done == total else ""))
        elif done == total or done % max(1, total // 4) == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def save_quant(path: str | os.PathLike, quant, meta: dict) -> None:
    """Saves a 'quant' collection (orbax) and ``meta`` (JSON) under ``path``."""
    path = os.path.abspath(os.fspath(path))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "quant"), quant, force=True)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_quant(path: str | os.PathLike, model: nn.Module, params, rules, sample):
    """Restores a 'quant' collection saved by ``save_quant`` for ``model`` quantized by
    ``rules`` (its structure and recipes come from an abstract ``freeze``)."""
    path = os.path.abspath(os.fspath(path))
    abstract = jax.eval_shape(lambda p: freeze(model, p, sample, rules=rules)[0], params)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(os.path.join(path, "quant"), abstract)


def quantize_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Quantizes the latest checkpoint of ``workdir`` (else ``config.model.pretrained``) per
    ``config.ptq``; prints the table.

    Returns:
      ``(results, reports)``: the ``EvalResult`` of float and of every variant, in table
      order, and the ``QuantReport`` of every variant by name (``'gptq_int4_g128'``).
    """
    c = config.ptq
    if c.method not in ("hessian", "rtn"):
        raise ValueError(f"config.ptq.method={c.method!r}: expected 'hessian' or 'rtn'.")
    formats = [f for f in c.format.split(",") if f]
    if not formats:
        raise ValueError("config.ptq.format: empty; name quantizers such as 'int4_g128,mxfp4'.")
    rules_by_format = {f: ptq_rules(f, c.group_size) for f in formats}  # bad names fail here
    trainer = Trainer(config, workdir)
    with trainer.checkpoint_manager() as manager:
        params, step = trainer.initial_params(manager, "ptq")
    params = jax.device_get(nn.unbox(params))
    model = trainer.float_model
    batches = calibration_batches(trainer, c.num_calibration_batches)
    evaluator = trainer.evaluator()
    results = [evaluator.evaluate({"params": params}, name="float")]
    lead = jax.process_index() == 0
    summaries = []
    reports = {}
    for fmt in formats:
        rules = rules_by_format[fmt]
        hessian_method = rules[0].weight.hessian_method
        for method in ["rtn", hessian_method] if c.method == "hessian" else ["rtn"]:
            t0 = time.perf_counter()
            name = f"{method}_{fmt}"
            if method == "rtn":
                quant, report = freeze(model, params, batches[0], rules=rules)
            else:
                quant, report = quantize_model(
                    model,
                    params,
                    batches,
                    rules,
                    damp=c.damp,
                    order=c.order or None,
                    progress=_LayerBar(f"{method} {fmt}") if lead else None,
                )
            seconds = time.perf_counter() - t0
            reports[name] = report
            results.append(evaluator.evaluate_quantized(params, quant, rules, report, name=name))
            meta = {
                "method": method,
                "format": fmt,
                "group_size": c.group_size,
                "num_calibration_batches": c.num_calibration_batches,
                "step": step,
                "pretrained": config.model.get("pretrained", ""),
                "val_loss": results[-1].loss,
            }
            if lead:
                save_quant(os.path.join(os.fspath(workdir), "ptq", name), quant, meta)
            if method != "rtn" and report.weights:
                ratios = [r.error / r.rtn_error for r in report.weights if r.rtn_error > 0]
                worst = max(report.weights, key=lambda r: r.error / max(r.rtn_error, 1e-30))
                summaries.append(
                    f"{name}: {len(report.weights)} layers in {seconds:.1f} s; layer error / "
                    f"RTN's: mean {np.mean(ratios):.3f}, worst {max(ratios):.3f} ({worst.path})"
                )
    if lead:
        print(evaluator_lib.format_table(results))
        for line in summaries:
            print(line)
    return results, reports
