"""TensorBoard scalars written and read back, the console progress line, and format_eta."""

import io
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.train import metrics
from jaxquant.train.metrics import MetricWriter, format_eta, read_scalars


class FakeClock:
    """A clock the test sets by hand."""

    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


class TtyStringIO(io.StringIO):
    def isatty(self):
        return True


def _write_three_steps(workdir):
    rng = np.random.default_rng(0)
    written = {}
    with MetricWriter(workdir, total_steps=3, stream=io.StringIO()) as writer:
        for step in (1, 2, 3):
            loss, ppl = rng.normal(size=2)
            scalars = {
                "train/loss": jnp.asarray(loss, jnp.float32),  # 0-d jax.Array
                "eval/perplexity": np.float64(ppl),  # 0-d numpy
                "train/learning_rate": float(step) * 1e-3,  # Python float
            }
            writer.write_scalars(step, scalars)
            for tag, v in scalars.items():
                written.setdefault(tag, []).append((step, float(np.float32(v))))
    return writer.logdir, written


def test_scalars_are_read_back_exactly(tmp_path):
    logdir, written = _write_three_steps(tmp_path)
    assert logdir == os.path.join(str(tmp_path), "tensorboard")
    assert any("tfevents" in name for name in os.listdir(logdir))
    # Event files store float32: the values come back equal to the float32 of what was written.
    assert read_scalars(logdir) == written


def test_tfrecord_parser_agrees_and_skips_a_truncated_record(tmp_path):
    logdir, written = _write_three_steps(tmp_path)
    assert metrics._read_scalars_tfrecord(logdir) == written
    # A file still being written ends in a partial record: it is ignored, not an error.
    (path,) = [os.path.join(logdir, n) for n in os.listdir(logdir)]
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "ab") as f:
        f.write(data[-30:-5])
    assert metrics._read_scalars_tfrecord(logdir) == written


def test_non_scalar_value_raises_naming_the_tag(tmp_path):
    with MetricWriter(tmp_path, total_steps=1, stream=io.StringIO()) as writer:
        with pytest.raises(ValueError, match="train/loss"):
            writer.write_scalars(1, {"train/loss": np.zeros(2)})


def test_disabled_writer_creates_no_files_and_prints_nothing(tmp_path):
    stream = TtyStringIO()
    with MetricWriter(tmp_path / "run", total_steps=2, enabled=False, stream=stream) as w:
        w.write_scalars(1, {"train/loss": 1.0})
        w.progress(1, loss=1.0, tokens=10)
        w.log("hello")
        w.progress(2, loss=1.0, tokens=10)
        w.flush()
    assert list(tmp_path.iterdir()) == []
    assert stream.getvalue() == ""


def test_progress_prints_one_line_per_step_when_not_a_tty(tmp_path):
    stream = io.StringIO()
    clock = FakeClock()
    with MetricWriter(tmp_path, total_steps=10, stream=stream, clock=clock) as writer:
        for step in range(1, 11):
            clock.t = float(step)
            writer.progress(step, loss=2.5, tokens=1000)
    out = stream.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 10
    for step, line in enumerate(lines, start=1):
        assert f"step {step}/10 " in line
        assert "loss 2.5000" in line
        assert "tok/s" in line
        assert "ETA" in line
    # The first line has no interval to time yet; then 1000 tokens per 1 s step.
    assert "- tok/s | ETA -" in lines[0]
    assert "1,000 tok/s | ETA 0:00:07" in lines[2]
    assert lines[-1].endswith("ETA 0:00:00")
    assert "[####################] 100%" in lines[-1]


def test_tokens_per_second_and_eta_from_injected_clock(tmp_path):
    stream = io.StringIO()
    clock = FakeClock(10.0)
    writer = MetricWriter(tmp_path, total_steps=10, stream=stream, clock=clock, log_every=3)
    for step in range(1, 11):
        # 0.5 s per step, but steps 7-9 take 3 s in all (a slow interval).
        clock.t = 10.0 + 0.5 * step + (1.5 if step >= 7 else 0.0)
        writer.progress(step, loss=1.0, tokens=50)
    writer.close()
    lines = stream.getvalue().splitlines()
    # Printed at steps 3, 6, 9 and the final step 10.
    assert [line.split()[1] for line in lines] == ["3/10", "6/10", "9/10", "10/10"]
    # Steps 4-6: 150 tokens in 1.5 s = 100 tok/s; 0.5 s/step, 4 steps left.
    assert "| 100 tok/s | ETA 0:00:02" in lines[1]
    # Steps 7-9: 150 tokens in 3 s = 50 tok/s; EMA 0.3 * 50 + 0.7 * 100 = 85;
    # s/step EMA 0.3 * 1 + 0.7 * 0.5 = 0.65, 1 step left: 0.65 s rounds to 0:00:01.
    assert "| 85 tok/s | ETA 0:00:01" in lines[2]
    # Step 10: 50 tokens in 0.5 s = 100 tok/s; EMA 0.3 * 100 + 0.7 * 85 = 89.5 -> '90'.
    assert "| 90 tok/s | ETA 0:00:00" in lines[3]


def test_progress_rewrites_one_line_on_a_tty_and_log_ends_it(tmp_path):
    stream = TtyStringIO()
    clock = FakeClock()
    with MetricWriter(tmp_path, total_steps=3, stream=stream, clock=clock) as writer:
        writer.progress(1, loss=1.0, tokens=1)
        writer.progress(2, loss=1.0, tokens=1)
        writer.log("eval: perplexity 12.3")
        writer.progress(3, loss=1.0, tokens=1)
    out = stream.getvalue()
    first, logged, last, empty = out.split("\n")
    assert first.count("\r") == 2 and "step 2/3" in first.rsplit("\r", 1)[1]
    assert logged == "eval: perplexity 12.3"
    assert last.startswith("\rstep 3/3 ")
    assert empty == ""  # the final step ends its line


def test_close_ends_an_unfinished_tty_line(tmp_path):
    stream = TtyStringIO()
    writer = MetricWriter(tmp_path, total_steps=5, stream=stream)
    writer.progress(1, loss=1.0, tokens=1)
    writer.close()
    writer.close()  # idempotent
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, "0:00:00"),
        (1.4, "0:00:01"),
        (65, "0:01:05"),
        (3599.6, "1:00:00"),
        (3 * 3600 + 25 * 60 + 7, "3:25:07"),
        (90000, "25:00:00"),
    ],
)
def test_format_eta(seconds, expected):
    assert format_eta(seconds) == expected


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_format_eta_rejects_bad_seconds(seconds):
    with pytest.raises(ValueError, match="seconds"):
        format_eta(seconds)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": -3}, "total_steps"),
        ({"total_steps": 2.0}, "total_steps"),
        ({"total_steps": 10, "log_every": 0}, "log_every"),
        ({"total_steps": 10, "smoothing": 0.0}, "smoothing"),
        ({"total_steps": 10, "flush_secs": 0}, "flush_secs"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        MetricWriter(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_read_scalars_rejects_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="logdir"):
        read_scalars(tmp_path / "missing")
