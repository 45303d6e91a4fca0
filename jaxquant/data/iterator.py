"""Batches of token windows for next-token language-model training and evaluation.

Terminology:
  window:       ``seq_len + 1`` consecutive tokens starting at a window start; ``inputs`` are its
                first ``seq_len`` tokens and ``targets`` its last ``seq_len`` (inputs shifted by
                one), so every position predicts the token after it.
  global batch: the ``batch_size`` windows of one step, over all processes.
  local batch:  the contiguous slice ``[process_index * b, (process_index + 1) * b)`` of the
                global batch, ``b = batch_size // process_count``, that one process loads; the
                local batches of processes ``0..process_count-1`` concatenate to the global one.
  epoch:        one pass over a shuffled set of non-overlapping windows; the number of steps per
                epoch is ``num_windows // batch_size`` (the remainder of each epoch is dropped).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax
import numpy as np


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive int.")
    return int(value)


def _check_tokens(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D array of token ids, got shape {tokens.shape}.")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens: expected integer token ids, got dtype {tokens.dtype}.")
    return tokens.astype(np.int32, copy=False)


def _process_slice(batch_size, process_index, process_count) -> tuple[int, int]:
    """(process_index, local batch size), with defaults from JAX and the arguments checked."""
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    process_count = _check_positive("process_count", process_count)
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r}: expected an int in "
            f"[0, process_count={process_count})."
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size}: must be divisible by process_count={process_count} "
            "(every process loads the same number of windows)."
        )
    return int(process_index), batch_size // process_count


class BatchIterator:
    """Shuffled, deterministic, resumable and per-process sharded training batches.

    The corpus is cut into ``num_windows = (len(tokens) - 1) // seq_len`` non-overlapping
    windows of ``seq_len + 1`` tokens (neighbours share one token: the last target of a window is
    the first input of the next). At each epoch a numpy ``Generator`` seeded with
    ``(seed, epoch)`` draws a shift of every window start by the same ``offset`` in
    ``[0, len(tokens) - 1 - num_windows * seq_len]`` (the tokens left over, so window boundaries
    move between epochs) and a permutation of the windows; step ``s`` of the epoch takes windows
    ``[s * batch_size, (s + 1) * batch_size)`` of that permutation. The batch of a step is thus a
    pure function of ``(tokens, batch_size, seq_len, seed, step)``, the same on every process and
    independent of ``process_count``, which only picks the slice a process loads. Resuming from
    ``state()`` continues bit-identically, on any number of processes.

    Iterating yields, forever, dicts of host numpy arrays (make them global ``jax.Array``s with
    ``jax.make_array_from_process_local_data``):

    * ``'inputs'``: int32 ``[local_batch_size, seq_len]``;
    * ``'targets'``: int32 ``[local_batch_size, seq_len]``, ``inputs`` shifted by one token.

    Args:
      tokens: 1-D integer token ids of the training text (stored as int32).
      batch_size: global batch size, windows per step over all processes.
      seq_len: tokens per sequence (a window holds ``seq_len + 1``).
      seed: a non-negative int; the order of windows is a function of it.
      process_index: this process's index; default ``jax.process_index()``.
      process_count: number of processes; default ``jax.process_count()``. Must divide
        ``batch_size``.
      step: the step of the first batch (``state()['step']`` of a checkpoint to resume from).

    Example:
      >>> tokens = ByteTokenizer().encode(load_text("train"))
      >>> it = BatchIterator(tokens, batch_size=64, seq_len=256, seed=0)
      >>> batch = next(it)  # {'inputs': int32[64, 256], 'targets': int32[64, 256]}
      >>> saved = it.state()  # {'step': 1, 'seed': 0}: put it in the checkpoint
      >>> it = BatchIterator(tokens, batch_size=64, seq_len=256, seed=0)
      >>> it.restore(saved)  # the next batch is the one an uninterrupted run would see
    """

    def __init__(
        self,
        tokens,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        step: int = 0,
    ):
        self.tokens = _check_tokens(tokens)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.seq_len = _check_positive("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected a non-negative int.")
        self.seed = int(seed)
        self.process_index, self.local_batch_size = _process_slice(
            self.batch_size, process_index, process_count
        )
        n = self.tokens.size
        if self.seq_len + 1 > n:
            raise ValueError(
                f"seq_len={self.seq_len}: a window needs seq_len + 1 = {self.seq_len + 1} tokens, "
                f"but the corpus has {n}."
            )
        self.num_windows = (n - 1) // self.seq_len
        if self.num_windows < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size}: the corpus of {n} tokens holds only "
                f"{self.num_windows} windows of seq_len + 1 = {self.seq_len + 1} tokens."
            )
        self.steps_per_epoch = self.num_windows // self.batch_size
        self._max_offset = n - 1 - self.num_windows * self.seq_len
        self._epoch_cache: tuple[int, np.ndarray] | None = None
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step={step!r}: expected a non-negative int.")
        self._step = int(step)

    @property
    def step(self) -> int:
        """The step of the batch ``next`` returns."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch of the batch ``next`` returns."""
        return self._step // self.steps_per_epoch

    def state(self) -> dict[str, int]:
        """``{'step': ..., 'seed': ...}``: python ints for a checkpoint; see ``restore``."""
        return {"step": self._step, "seed": self.seed}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from ``state`` (from ``state()``; ints or 0-d arrays, as orbax returns them).

        Raises:
          ValueError: ``state`` has no non-negative ``'step'``, or its ``'seed'`` differs from
            this iterator's (the order of windows would not be the one checkpointed).
        """
        if "step" not in state:
            raise ValueError(f"state={dict(state)!r}: expected a 'step' entry.")
        step = int(np.asarray(state["step"]))
        if step < 0:
            raise ValueError(f"state['step']={step}: expected a non-negative int.")
        if "seed" in state and int(np.asarray(state["seed"])) != self.seed:
            raise ValueError(
                f"state['seed']={int(np.asarray(state['seed']))}: this iterator has "
                f"seed={self.seed}; resuming would change the order of the data."
            )
        self._step = step

    def window_starts(self, step: int) -> np.ndarray:
        """int64 ``[batch_size]``: token index of each window of the global batch at ``step``."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step={step}: expected a non-negative int.")
        epoch, i = divmod(step, self.steps_per_epoch)
        starts = self._epoch_starts(epoch)
        return starts[i * self.batch_size : (i + 1) * self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch at ``step`` (random access; does not move the iterator)."""
        b = self.local_batch_size
        starts = self.window_starts(step)[self.process_index * b : (self.process_index + 1) * b]
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # [b, seq_len + 1]
        return {
            "inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:]),
        }

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        # Steps run in order, so a one-epoch cache makes each permutation drawn once.
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self._max_offset, endpoint=True))
            order = rng.permutation(self.num_windows)
            self._epoch_cache = (epoch, offset + order * self.seq_len)
        return self._epoch_cache[1]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def __repr__(self) -> str:
        return (
            f"BatchIterator(tokens=<{self.tokens.size}>, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, seed={self.seed}, process_index={self.process_index}, "
            f"local_batch_size={self.local_batch_size}, step={self._step})"
        )


def num_eval_batches(num_tokens: int, *, batch_size: int, seq_len: int) -> int:
    """Number of batches ``eval_batches`` yields for ``num_tokens`` tokens."""
    batch_size = _check_positive("batch_size", batch_size)
    seq_len = _check_positive("seq_len", seq_len)
    num_windows = -(-max(num_tokens - 1, 0) // seq_len)
    return -(-num_windows // batch_size)


def eval_batches(
    tokens,
    *,
    batch_size: int,
    seq_len: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """In-order, non-overlapping, padded and masked batches that cover every target once.

    Window ``k`` has inputs ``tokens[k*seq_len : (k+1)*seq_len]`` and targets one token later,
    so the targets of all windows are ``tokens[1:]``, each exactly once (the first token has no
    context and is never a target). The last window and the last batch are padded with token 0
    and ``mask`` 0, so every batch has the same shape (one compilation) and
    ``sum(mask) == len(tokens) - 1``. Evaluate with ``sum(loss * mask) / sum(mask)`` (and
    ``sum(token_bytes[targets] * mask)`` for bits per byte). Nothing is shuffled or dropped.

    Sharding is as for ``BatchIterator``: each process gets its contiguous slice of every global
    batch, and every process yields the same number of batches.

    Args:
      tokens: 1-D integer token ids of the evaluation text.
      batch_size: global batch size; must be divisible by ``process_count``.
      seq_len: tokens per sequence.
      process_index: this process's index; default ``jax.process_index()``.
      process_count: number of processes; default ``jax.process_count()``.

    Returns:
      An iterator over ``num_eval_batches(len(tokens), ...)`` dicts with int32 ``'inputs'``
      and ``'targets'`` and float32 ``'mask'`` (1 for a real target, 0 for padding), each
      ``[local_batch_size, seq_len]``.
    """
    tokens = _check_tokens(tokens)
    batch_size = _check_positive("batch_size", batch_size)
    seq_len = _check_positive("seq_len", seq_len)
    if tokens.size < 2:
        raise ValueError(f"tokens: {tokens.size} token(s); evaluation needs at least 2.")
    process_index, local = _process_slice(batch_size, process_index, process_count)
    num_targets = tokens.size - 1
    num_batches = num_eval_batches(tokens.size, batch_size=batch_size, seq_len=seq_len)
    # Room for every window of every batch, plus the one token the last target window reads.
    padded = np.zeros(num_batches * batch_size * seq_len + 1, np.int32)
    padded[: tokens.size] = tokens
    valid = np.zeros(padded.size - 1, np.float32)
    valid[:num_targets] = 1.0
    inputs = padded[:-1].reshape(num_batches, batch_size, seq_len)
    targets = padded[1:].reshape(num_batches, batch_size, seq_len)
    mask = valid.reshape(num_batches, batch_size, seq_len)
    rows = slice(process_index * local, (process_index + 1) * local)
    # A generator inside, so that bad arguments raise here, at the call, not at the first next().
    return (
        {"inputs": inputs[i, rows], "targets": targets[i, rows], "mask": mask[i, rows]}
        for i in range(num_batches)
    )
