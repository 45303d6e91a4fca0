"""Validation loss, perplexity and bits per byte of a float model and its quantized variants.

Terminology:
  loss:            mean cross-entropy per target token, in nats, over every target of the
                   validation tokens exactly once (``eval_batches`` pads and masks the tail).
  perplexity:      ``exp(loss)``.
  bits per byte:   ``loss / (ln 2 · bytes_per_token)``, comparable across tokenizers.
  bits per weight: ``8 · model_bytes / number of parameters`` of the served model, every
                   overhead (scales, zero points, float leftovers) counted.

Example::

    evaluator = Evaluator(model, valid_tokens, batch_size=16, seq_len=256,
                          bytes_per_token=tokenizer.bytes_per_token(valid_text))
    results = evaluator.compare(params, default_variants())   # float, int8, int4 (RTN)
    print(format_table(results))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.data import bits_per_byte as _bits_per_byte
from jaxquant.data import eval_batches
from jaxquant.models import Llama
from jaxquant.nn import QuantConfig, QuantRule, freeze, serving_params
from jaxquant.numerics import INT4, INT8, is_quantized


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over the masked tokens.

    ``sum_nats = Σ_{b,t} mask[b,t] · (logsumexp(logits[b,t]) − logits[b,t,targets[b,t]])``,
    computed in float32 whatever the logits' dtype.

    Args:
      logits: float [batch, seq, vocab].
      targets: int [batch, seq], the token each position predicts.
      mask: [batch, seq] token weights, 1 for a real target and 0 for padding.

    Returns:
      ``(sum_nats, num_tokens)``: float32 scalars, the masked sum of the per-token losses and
      ``sum(mask)``; their ratio is the mean loss in nats per token.

    Example:
      >>> s, n = cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))
      >>> float(s / n)  # ln 4
      1.3862943649291992
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, seq, vocab]
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    # where, not a product: a padded position must add 0 even if its loss is not finite.
    return jnp.sum(jnp.where(mask != 0, nll * mask, 0.0)), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One model's validation metrics (losses in nats per token, sizes of the served model)."""

    name: str
    loss: float
    perplexity: float
    bits_per_byte: float
    bits_per_weight: float
    model_bytes: int
    num_tokens: int


def default_variants() -> dict[str, tuple[QuantRule, ...]]:
    """Round-to-nearest weight-only variants: INT8 and INT4 per-channel on every linear layer.

    Embeddings and the output head stay in float (rules touch ``'linear'`` layers by default).
    """
    return {
        "int8": (QuantRule(".*", weight=INT8),),
        "int4": (QuantRule(".*", weight=INT4),),
    }


def _size_and_bytes(variables) -> tuple[int, int]:
    """(number of parameters, bytes) of every array in ``variables``, quantized tensors by
    their shape and stored bytes."""
    num, nbytes = 0, 0
    for leaf in jax.tree.leaves(variables, is_leaf=is_quantized):
        if is_quantized(leaf):
            num, nbytes = num + leaf.size, nbytes + leaf.nbytes
        else:
            num += math.prod(np.shape(leaf))
            nbytes += math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize
    return num, nbytes


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"Evaluator {name}={value!r}: expected a positive int.")
    return int(value)


class Evaluator:
    """Evaluates a model (float or served quantized) on fixed validation tokens.

    Every target of ``tokens`` counts once (or those of the first ``max_batches`` batches),
    weighted by ``eval_batches``' mask, so the loss is exact whatever the padding. One jitted
    step per distinct model (the float model and each serve-mode clone) returns the batch's
    ``(sum_nats, num_tokens)``; the sums accumulate in float64 on the host.

    Every process evaluates all batches (not a per-process slice), so each one returns the
    same, complete result.
    """

    def __init__(
        self,
        model: Llama,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        bytes_per_token: float,
        max_batches: int | None = None,
    ):
        """Checks the arguments; nothing is compiled until the first ``evaluate``.

        Args:
          model: the float model (a Llama, or any Linen model mapping int32 [batch, seq] tokens
            to [batch, seq, vocab] logits that has a ``quant`` field for ``compare``).
          tokens: 1-D integer validation token ids, at least ``seq_len + 1`` of them.
          batch_size: windows per evaluation step.
          seq_len: tokens per window.
          bytes_per_token: UTF-8 bytes per token of the validation text (for bits per byte).
          max_batches: evaluate only the first ``max_batches`` batches (default: all).
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(
                f"Evaluator tokens: expected a 1-D array of integer token ids, got shape "
                f"{tokens.shape} and dtype {tokens.dtype}."
            )
        if tokens.size < 2:
            raise ValueError(
                f"Evaluator tokens: {tokens.size} validation token(s); evaluation needs at "
                "least 2 (the first token is never a target)."
            )
        self.batch_size = _check_positive("batch_size", batch_size)
        self.seq_len = _check_positive("seq_len", seq_len)
        if self.seq_len > tokens.size - 1:
            raise ValueError(
                f"Evaluator seq_len={seq_len}: longer than the {tokens.size - 1} validation "
                "targets; use a shorter seq_len or more validation tokens."
            )
        if isinstance(bytes_per_token, bool) or not (
            isinstance(bytes_per_token, (int, float, np.number)) and bytes_per_token > 0
        ):
            raise ValueError(
                f"Evaluator bytes_per_token={bytes_per_token!r}: expected a positive number."
            )
        if max_batches is not None:
            max_batches = _check_positive("max_batches", max_batches)
        self.model = model
        self.tokens = tokens.astype(np.int32, copy=False)
        self.bytes_per_token = float(bytes_per_token)
        self.max_batches = max_batches
        self._steps: dict[nn.Module, object] = {}

    def _step(self, model: nn.Module):
        """The jitted ``(variables, batch) -> (sum_nats, num_tokens)`` of ``model`` (cached)."""
        step = self._steps.get(model)
        if step is None:

            def eval_step(variables, batch):
                logits = model.apply(variables, batch["inputs"])
                return cross_entropy(logits, batch["targets"], batch["mask"])

            step = self._steps[model] = jax.jit(eval_step)
        return step

    def _batches(self):
        batches = eval_batches(
            self.tokens,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            process_index=0,
            process_count=1,
        )
        for i, batch in enumerate(batches):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield batch

    def evaluate(
        self,
        variables,
        *,
        model: nn.Module | None = None,
        name: str = "float",
        bits_per_weight: float | None = None,
        model_bytes: int | None = None,
    ) -> EvalResult:
        """Loss, perplexity and bits per byte of ``model`` with ``variables``.

        Args:
          variables: ``{'params': ...}`` (boxed or not), or the served
            ``{'params': serving_params(params, quant), 'quant': quant}``.
          model: the model to apply, e.g. a serve-mode clone (default: ``self.model``).
          name: the result's name.
          bits_per_weight: of the evaluated model; default ``8 · model_bytes / parameters``
            counted from ``variables`` (32 for float32 params).
          model_bytes: of the evaluated model; default the bytes of every array in
            ``variables`` (a quantized tensor's codes, scales and the rest).

        Returns:
          An ``EvalResult``.
        """
        model = self.model if model is None else model
        variables = nn.unbox(variables)
        num_params, num_bytes = _size_and_bytes(variables)
        if model_bytes is None:
            model_bytes = num_bytes
        if bits_per_weight is None:
            bits_per_weight = 8 * num_bytes / max(1, num_params)
        step = self._step(model)
        # Dispatch every batch before reading any result back, so host and device overlap.
        sums = [step(variables, batch) for batch in self._batches()]
        sums = np.asarray(jax.device_get(sums), np.float64)  # [batches, 2]
        sum_nats, num_tokens = sums.sum(axis=0)
        loss = float(sum_nats / num_tokens)
        return EvalResult(
            name=name,
            loss=loss,
            perplexity=math.exp(loss) if loss < 700 else math.inf,
            bits_per_byte=_bits_per_byte(loss, self.bytes_per_token),
            bits_per_weight=float(bits_per_weight),
            model_bytes=int(model_bytes),
            num_tokens=int(round(num_tokens)),
        )

    def compare(
        self, params, variants: Mapping[str, Sequence[QuantRule]] | None = None
    ) -> list[EvalResult]:
        """The float model, then each variant frozen (RTN) with its rules and served.

        Args:
          params: the float 'params' collection (boxed or not).
          variants: name -> rules (default ``default_variants()``: int8 and int4 weights).

        Returns:
          ``[float, *variants]`` results, the variants' sizes from their ``QuantReport``.
        """
        variants = default_variants() if variants is None else variants
        if "float" in variants:
            raise ValueError("Evaluator.compare variants: the name 'float' is the float model's.")
        params = nn.unbox(params)
        results = [self.evaluate({"params": params}, name="float")]
        sample = jnp.zeros((1, self.seq_len), jnp.int32)
        for name, rules in variants.items():
            rules = tuple(rules)
            quant, report = freeze(self.model, params, sample, rules=rules)
            results.append(self.evaluate_quantized(params, quant, rules, report, name=name))
        return results

    def evaluate_quantized(self, params, quant, rules, report, *, name: str) -> EvalResult:
        """The model served from ``quant`` (made with ``rules``), sized by ``report`` (the
        ``QuantReport`` of ``freeze`` or ``quantize_model``)."""
        served = self.model.clone(quant=QuantConfig(mode="serve", rules=tuple(rules)))
        return self.evaluate(
            {"params": serving_params(nn.unbox(params), quant), "quant": quant},
            model=served,
            name=name,
            bits_per_weight=report.bits_per_weight,
            model_bytes=report.model_bytes,
        )


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_table(results: Sequence[EvalResult]) -> str:
    """A markdown table of the results, with the loss change against the first row."""
    lines = [
        "| model | val loss | Δ loss | perplexity | bits/byte | bits/weight | model bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = results[0].loss if results else 0.0
    for r in results:
        lines.append(
            f"| {r.name} | {r.loss:.4f} | {r.loss - base:+.4f} | {r.perplexity:.3f} | "
            f"{r.bits_per_byte:.4f} | {r.bits_per_weight:.3f} | "
            f"{_human_bytes(r.model_bytes)} ({r.model_bytes:,}) |"
        )
    return "\n".join(lines)
