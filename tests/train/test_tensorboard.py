"""TensorBoard summaries are real event files that TensorBoard's own reader parses back."""

from __future__ import annotations

import glob

import pytest

from jaxspeech.train.metrics import make_tensorboard_writer

pytest.importorskip("tensorboard")


def test_scalars_round_trip(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  w = make_tensorboard_writer(str(tmp_path))
  assert w is not None
  for step, loss in [(1, 3.5), (2, 2.25), (5, 1.0)]:
    w.write_scalars(step, {"loss": loss, "lr": 1e-3 * step})
  w.close()
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  acc = EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  got = [(e.step, e.value) for e in acc.Scalars("loss")]
  assert got == [(1, 3.5), (2, 2.25), (5, 1.0)]
  assert abs(acc.Scalars("lr")[-1].value - 5e-3) < 1e-9
