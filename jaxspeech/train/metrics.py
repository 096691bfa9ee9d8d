"""Metrics: clu averages over the logging window, `metrics.jsonl`, TensorBoard, a progress line.

`clu.metrics` works without TensorFlow; `clu.metric_writers` does not (it imports TF), so
TensorBoard summaries are written with the `tensorboard` package directly when it is installed
(`pip install tensorboard`), and skipped with a one-time note otherwise.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from clu import metrics as clu_metrics


class WindowAverages:
  """Averages of every per-step scalar metric over the current logging window (clu.Average)."""

  def __init__(self):
    self._avgs: dict[str, clu_metrics.Average] = {}

  def update(self, step_metrics: dict) -> None:
    for k, v in step_metrics.items():
      m = clu_metrics.Average.from_model_output(np.asarray(v, np.float64))
      self._avgs[k] = self._avgs[k].merge(m) if k in self._avgs else m

  def compute_and_reset(self) -> dict[str, float]:
    out = {k: float(m.compute()) for k, m in self._avgs.items()}
    self._avgs = {}
    return out


class TensorBoardWriter:
  """Scalar summaries in TensorBoard's event-file format, via the `tensorboard` package."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._writer = EventFileWriter(logdir)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                  summary=self._summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def make_tensorboard_writer(workdir: str) -> TensorBoardWriter | None:
  try:
    import tensorboard  # noqa: F401
  except ImportError:
    logging.info('tensorboard is not installed: TensorBoard summaries skipped '
                 '(metrics.jsonl is written; `pip install tensorboard` to enable them)')
    return None
  return TensorBoardWriter(os.path.join(workdir, 'tensorboard'))


class MetricsLogger:
  """Writes `WORKDIR/metrics.jsonl` rows and TensorBoard scalars, prints the progress line."""

  def __init__(self, workdir: str, num_steps: int, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.num_steps = num_steps
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = make_tensorboard_writer(workdir) if self.enabled else None
    self._t0 = None
    self._step0 = None

  def start(self, step: int) -> None:
    self._t0, self._step0 = time.perf_counter(), step

  def write(self, step: int, scalars: dict[str, float], audio_seconds: float,
            extra: dict | None = None) -> str:
    """Logs one row; returns the progress line. Rates are over the window since the last row
    (the first window includes compilation)."""
    now = time.perf_counter()
    elapsed, done = now - self._t0, step - self._step0
    self._t0, self._step0 = now, step
    steps_s = done / elapsed if elapsed > 0 else float('nan')
    hours_s = audio_seconds / 3600.0 / elapsed if elapsed > 0 else float('nan')
    eta = (self.num_steps - step) / steps_s if steps_s > 0 else float('nan')
    row = {'step': int(step), **{k: _finite_or_str(v) for k, v in scalars.items()},
           'steps_per_sec': steps_s, 'audio_hours_per_sec': hours_s, **(extra or {})}
    line = (f'step {step}/{self.num_steps} loss {scalars.get("loss", float("nan")):.4f} '
            + ' '.join(f'{k} {v:.4g}' for k, v in scalars.items()
                       if k not in ('loss', 'audio_seconds'))
            + f' | {steps_s:.2f} steps/s {hours_s * 3600:.1f} audio-s/s'
            + f' ({hours_s:.3g} audio-h/s) ETA {_fmt_time(eta)}')
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
      if self.tb is not None:
        self.tb.write_scalars(step, scalars)
        self.tb.flush()
    return line

  def write_eval(self, step: int, results: dict[str, float]) -> str:
    """Logs evaluation results (`eval/<name>/<metric>`) as their own metrics.jsonl row and
    TensorBoard scalars; returns a progress line."""
    if self.enabled and results:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': int(step),
                            **{k: _finite_or_str(v) for k, v in results.items()}}) + '\n')
      if self.tb is not None:
        self.tb.write_scalars(step, results)
        self.tb.flush()
    return f'step {step}/{self.num_steps} ' + ' '.join(f'{k} {v:.4g}' for k, v in results.items())

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _finite_or_str(v: float):
  return v if math.isfinite(v) else repr(v)


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'
