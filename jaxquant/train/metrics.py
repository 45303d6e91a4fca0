"""Training metrics: TensorBoard scalars, a console progress line, and reading events back.

Terminology:
  scalars:   ``{tag: value}`` with tags such as ``'train/loss'`` or ``'eval/perplexity'``; each
             value is a Python number or a 0-d ``jax.Array`` / ``np.ndarray``.
  event file: the ``events.out.tfevents.*`` file that ``tensorboardX.SummaryWriter`` writes
             under ``<workdir>/tensorboard/``: TFRecord framing (8-byte little-endian length,
             4-byte masked CRC-32C of the length, the serialized ``Event``, 4-byte masked
             CRC-32C of the data).
  tok/s:     tokens processed since the previous printed progress line divided by the wall time
             since then, smoothed with an exponential moving average (EMA).
  ETA:       remaining steps x the EMA of seconds per step, formatted ``h:mm:ss``.

One ``MetricWriter`` per run; in a multi-host run only process 0 enables it
(``enabled=jax.process_index() == 0``), and a disabled writer does nothing at all: no files,
no console output.

Example::

  with MetricWriter(workdir, total_steps=config.num_steps) as writer:
    for step in range(1, config.num_steps + 1):
      state, metrics = train_step(state, batch)
      writer.write_scalars(step, {"train/loss": metrics["loss"]})
      writer.progress(step, loss=metrics["loss"], tokens=batch_tokens)
  scalars = read_scalars(os.path.join(workdir, "tensorboard"))
"""

from __future__ import annotations

import glob
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO

import jax
import numpy as np
import tensorboardX
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

_BAR_WIDTH = 20


def format_eta(seconds: float) -> str:
    """Formats a duration as ``h:mm:ss``, rounded to the nearest second.

    Args:
      seconds: a finite, non-negative duration in seconds.

    Returns:
      The duration as ``'h:mm:ss'``, e.g. ``format_eta(65) == '0:01:05'``; hours are not
      wrapped at 24 (``format_eta(90000) == '25:00:00'``).
    """
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"format_eta seconds={seconds!r}: expected a finite number >= 0.")
    total = math.floor(seconds + 0.5)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class MetricWriter:
    """Writes scalars to TensorBoard and a progress line to the console.

    Scalars go to an event file under ``<workdir>/tensorboard/`` (``tensorboardX``), flushed by
    its background thread every ``flush_secs`` seconds, by ``flush()``, and on ``close()``.
    The progress line goes to ``stream``: rewritten in place with ``\\r`` when ``stream`` is a
    TTY, one line per printed step otherwise (CI logs).

    Args:
      workdir: the run's directory; event files go to ``<workdir>/tensorboard/``.
      total_steps: the number of training steps, for ``step n/total``, the bar and the ETA.
      enabled: whether to write anything at all (``jax.process_index() == 0`` in a multi-host
        run); when False every method is a no-op and no file is created.
      stream: where the progress line and ``log`` messages go; ``None`` (the default) means
        ``sys.stderr`` as it is when the writer is built.
      log_every: print the progress line every this many steps (and always at the last step).
      clock: seconds as a float, for the tok/s and ETA measurements (tests inject a fake one).
      smoothing: the EMA weight of the newest tok/s and s/step measurement, in ``(0, 1]``.
      flush_secs: how often the event file is flushed to disk, in seconds.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        enabled: bool = True,
        stream: IO[str] | None = None,
        log_every: int = 1,
        clock: Callable[[], float] = time.monotonic,
        smoothing: float = 0.3,
        flush_secs: float = 30.0,
    ):
        for name, v in (("total_steps", total_steps), ("log_every", log_every)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"MetricWriter {name}={v!r}: expected an int >= 1.")
        if not 0 < smoothing <= 1:
            raise ValueError(f"MetricWriter smoothing={smoothing!r}: expected 0 < smoothing <= 1.")
        if not flush_secs > 0:
            raise ValueError(f"MetricWriter flush_secs={flush_secs!r}: expected a number > 0.")
        self.total_steps = int(total_steps)
        self.log_every = int(log_every)
        self.enabled = bool(enabled)
        self.logdir = os.path.join(os.fspath(workdir), "tensorboard")
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._smoothing = float(smoothing)
        self._writer = None
        if self.enabled:
            self._writer = tensorboardX.SummaryWriter(self.logdir, flush_secs=flush_secs)
        self._tty = self.enabled and isatty(self._stream)
        # Progress state: the time and step of the previous measurement, the tokens since.
        self._last_time: float | None = None
        self._last_step: int | None = None
        self._tokens_since = 0
        self._tokens_per_sec: float | None = None  # EMA
        self._secs_per_step: float | None = None  # EMA
        self._line_active = False  # a TTY progress line without its newline yet
        self._line_len = 0

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def write_scalars(
        self, step: int, scalars: Mapping[str, float | int | jax.Array | np.ndarray]
    ) -> None:
        """Writes each scalar under its tag at ``step``.

        Args:
          step: the training step the values belong to.
          scalars: ``{tag: value}``; values are Python numbers or 0-d arrays (converted with
            ``float``, which waits for a ``jax.Array`` to be computed).
        """
        if not self.enabled:
            return
        values = {}
        for tag, value in scalars.items():
            if np.ndim(value) != 0:
                raise ValueError(
                    f"MetricWriter.write_scalars scalars[{tag!r}]: expected a scalar, got shape "
                    f"{np.shape(value)}."
                )
            values[tag] = float(value)
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=int(step))

    def progress(self, step: int, *, loss: float | jax.Array | np.ndarray, tokens: int) -> None:
        """Records a finished step and prints the progress line every ``log_every`` steps.

        The line reads ``step 30/100 [######--------------]  30% | loss 2.3456 |
        12,345 tok/s | ETA 0:01:05``; tok/s and ETA show ``-`` until two printed steps have
        been timed (the first interval would include compilation).

        Args:
          step: the step just finished, counted from 1 to ``total_steps``.
          loss: the step's loss (a 0-d array is converted with ``float`` when printed).
          tokens: the tokens processed since the previous call (this step's batch).
        """
        if not self.enabled:
            return
        if tokens < 0:
            raise ValueError(f"MetricWriter.progress tokens={tokens!r}: expected >= 0.")
        self._tokens_since += int(tokens)
        step = int(step)
        if step % self.log_every != 0 and step != self.total_steps:
            return
        now = self._clock()
        if self._last_time is not None:
            elapsed = now - self._last_time
            steps = step - self._last_step
            if elapsed > 0 and steps > 0:
                self._tokens_per_sec = self._ema(self._tokens_per_sec, self._tokens_since / elapsed)
                self._secs_per_step = self._ema(self._secs_per_step, elapsed / steps)
        self._last_time, self._last_step, self._tokens_since = now, step, 0
        self._write_progress_line(
            self._format_line(step, float(loss)), final=step >= self.total_steps
        )

    def log(self, message: str) -> None:
        """Prints ``message`` on its own line, first ending an active progress line."""
        if not self.enabled:
            return
        self._end_line()
        self._stream.write(f"{message}\n")
        self._stream.flush()

    def flush(self) -> None:
        """Writes pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file and ends an active progress line; idempotent."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.enabled:
            self._end_line()

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self._smoothing * new + (1 - self._smoothing) * old

    def _format_line(self, step: int, loss: float) -> str:
        frac = min(max(step / self.total_steps, 0.0), 1.0)
        filled = round(frac * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        rate = "-" if self._tokens_per_sec is None else f"{self._tokens_per_sec:,.0f}"
        if self._secs_per_step is None:
            eta = "-"
        else:
            eta = format_eta(max(self.total_steps - step, 0) * self._secs_per_step)
        return (
            f"step {step}/{self.total_steps} [{bar}] {frac:4.0%} | loss {loss:.4f} | "
            f"{rate} tok/s | ETA {eta}"
        )

    def _write_progress_line(self, line: str, *, final: bool) -> None:
        if self._tty:
            # Pad with spaces so a shorter line fully covers the previous one.
            pad = " " * max(self._line_len - len(line), 0)
            self._stream.write(f"\r{line}{pad}")
            self._line_len = len(line)
            self._line_active = True
            if final:
                self._end_line()
        else:
            self._stream.write(f"{line}\n")
        self._stream.flush()

    def _end_line(self) -> None:
        if self._line_active:
            self._stream.write("\n")
            self._stream.flush()
            self._line_active = False
            self._line_len = 0


def isatty(stream) -> bool:
    """Whether ``stream`` is a terminal (progress lines then redraw in place)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Reads the scalars of the event files in ``logdir`` (not its subfolders).

    Uses TensorBoard's ``EventAccumulator`` when ``tensorboard`` is installed, and otherwise
    parses the TFRecord framing with ``tensorboardX``'s ``Event`` proto, checking each record's
    CRCs and stopping at a truncated or corrupt record (a file still being written).

    Args:
      logdir: the folder holding ``events.out.tfevents.*`` files, e.g. ``MetricWriter.logdir``.

    Returns:
      ``{tag: [(step, value), ...]}`` in the order written; values are float32-exact.
    """
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise ValueError(f"read_scalars logdir={logdir!r}: not a directory.")
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        return _read_scalars_tfrecord(logdir)
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {
        tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
        for tag in acc.Tags()[event_accumulator.SCALARS]
    }


def _read_scalars_tfrecord(logdir: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(logdir), "*tfevents*"))):
        if not os.path.isfile(path):
            continue
        for record in _tfrecords(path):
            event = event_pb2.Event.FromString(record)
            if event.WhichOneof("what") != "summary":
                continue
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    out.setdefault(value.tag, []).append((int(event.step), value.simple_value))
    return out


def _tfrecords(path: str):
    """Yields the data of each intact record of a TFRecord file."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        end = pos + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(data):
            return
        record = data[pos + 12 : pos + 12 + length]
        (record_crc,) = struct.unpack("<I", data[end - 4 : end])
        if record_crc != masked_crc32c(record):
            return
        yield record
        pos = end
