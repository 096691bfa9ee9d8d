"""The workdir contract: a training workdir never loses or misdescribes work.

    WORKDIR/
      config.json        the config its checkpoints were trained with (immutable once a
                         checkpoint exists; a ConfigDict as JSON, loadable on its own)
      history.jsonl      one row per run segment: steps, host, pid, time, changed run keys
      lock               held (flock) by the running process; holds its pid and host
      checkpoints/<step> Orbax steps; the last step of a run is always one of them
      metrics.jsonl      one row per logged step (and eval rows); truncated to the restored step
                         on resume, so every step appears once
      final_metrics.json written when a run reaches `train.num_steps`; never by a run that had
                         nothing left to do
      corrupt_checkpoints/<step>  a latest checkpoint that could not be restored, moved aside
                         when the run fell back to an older one (`train.allow_fallback`)

Rules (`check_config`): a re-run whose config differs from config.json in any key but the
`RUN_KEYS` stops with one line listing the differing keys, before anything is written.
`train.num_steps` may change (to continue training) as long as it is not below the latest
checkpoint; the change is a new segment in history.jsonl. A second run on a locked workdir stops
at once (`WorkdirLock`); a lock left by a killed process is released by the kernel (flock), so a
stale lock file never blocks.

Why our own code: Orbax manages the checkpoints folder only; it has no notion of a run's config,
of two processes on one workdir, or of the metrics log. The lock is `fcntl.flock` (released
automatically when its process dies, SIGKILL included).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

from jaxspeech.errors import UserError, one_line_reason  # noqa: F401 -- re-exported

CONFIG = 'config.json'
HISTORY = 'history.jsonl'
LOCK = 'lock'
METRICS = 'metrics.jsonl'
FINAL = 'final_metrics.json'
CORRUPT = 'corrupt_checkpoints'

# Keys a re-run may change: they decide how long to run, how often to log/save, and where; not
# what a step computes. `mesh.shape` may change to resume on another slice (same numbers on any
# mesh: tests/train/test_multidevice.py).
RUN_KEYS = (
  'train.num_steps', 'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
  'train.async_checkpointing', 'train.kill_after_step', 'train.allow_fallback',
  'data.cache_dir', 'mesh.shape.data', 'mesh.shape.fsdp', 'mesh.shape.model',
)


class WorkdirError(UserError):
  """The workdir refuses this run (locked, another config, corrupt checkpoints, not a folder)."""


# ---------------------------------------------------------------------------------------------
# Paths.


def prepare(workdir: str) -> str:
  """Absolute workdir, created if missing; a path that is a file (or under one) is refused."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir}: is a file, not a folder')
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    raise WorkdirError(f'--workdir {workdir}: cannot be created ({e.strerror}: {e.filename})'
                       ) from e
  return workdir


def remove_if_only_lock(workdir: str) -> bool:
  """Removes a workdir this run created and refused before writing anything but its lock."""
  if os.path.isdir(workdir) and set(os.listdir(workdir)) <= {LOCK}:
    for name in os.listdir(workdir):
      os.remove(os.path.join(workdir, name))
    os.rmdir(workdir)
    return True
  return False


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed Orbax steps in WORKDIR/checkpoints (folders named by an integer; Orbax's
  temporary folders of an unfinished save are named otherwise), ascending."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# The lock.


class WorkdirLock:
  """`with WorkdirLock(workdir):` -- one training run per workdir.

  An exclusive, non-blocking `flock` on WORKDIR/lock, which holds the owner's pid and host for
  the message another run prints. The kernel drops the lock when the owner dies (even by
  SIGKILL), so a lock file left behind is stale by construction and the next run takes it.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      owner = _read_json(self.path) or {}
      raise WorkdirError(
        f'{os.path.dirname(self.path)}: in use by another run (pid {owner.get("pid", "?")} on '
        f'{owner.get("host", "?")}, since {owner.get("started", "?")}); wait for it or use '
        'another --workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': _now()}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------------------------------
# The config and its history.


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def config_dict(config) -> dict:
  """A ConfigDict as the plain JSON tree config.json holds (tuples -> lists, etc.)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _short(v: Any) -> str:
  s = json.dumps(v)
  return s if len(s) <= 40 else s[:37] + '...'


def config_diff(old: dict, new: dict, ignore=RUN_KEYS) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} for every key that differs, missing ones as '<unset>'."""
  a, b = _flatten(old), _flatten(new)
  out = {}
  for k in sorted(set(a) | set(b)):
    if k in ignore:
      continue
    va, vb = a.get(k, '<unset>'), b.get(k, '<unset>')
    if va != vb:
      out[k] = (va, vb)
  return out


def check_config(workdir: str, config) -> dict[str, tuple[Any, Any]]:
  """Refuses (WorkdirError, nothing written) a config that differs from the one the workdir's
  checkpoints were trained with in any key but `RUN_KEYS`, or whose `train.num_steps` is below
  its latest checkpoint. Returns the changed run keys {key: (old, new)} (empty for a new
  workdir, or one without checkpoints whose config.json is simply replaced)."""
  steps = checkpoint_steps(workdir)
  old = _read_json(os.path.join(workdir, CONFIG))
  new = config_dict(config)
  if not steps or old is None:
    if steps and old is None:
      raise WorkdirError(f'{workdir}: has checkpoints {steps} but no readable {CONFIG}; refusing '
                         'to guess what they were trained with (restore the file or use another '
                         '--workdir)')
    return {}
  diff = config_diff(old, new)
  if diff:
    shown = ', '.join(f'{k} {_short(a)} -> {_short(b)}' for k, (a, b) in list(diff.items())[:6])
    more = f' (+{len(diff) - 6} more)' if len(diff) > 6 else ''
    raise WorkdirError(
      f'{workdir}: its checkpoints (step {steps[-1]}) were trained with another config: {shown}'
      f'{more}; only train.num_steps and the logging/checkpointing/mesh keys may change on a '
      're-run (use another --workdir for a new config)')
  num_steps = int(config.train.num_steps)
  if num_steps < steps[-1]:
    raise WorkdirError(f'{workdir}: train.num_steps={num_steps} is below its latest checkpoint '
                       f'(step {steps[-1]}); raise it to continue training, or use another '
                       '--workdir')
  run_changes = config_diff(old, new, ignore=())
  return {k: v for k, v in run_changes.items() if k not in diff}


def record_start(workdir: str, config, start_step: int, changed: dict) -> None:
  """Writes config.json (after `check_config` accepted it) and appends the segment to
  history.jsonl."""
  _write_atomic(os.path.join(workdir, CONFIG),
                config.to_json_best_effort(indent=1, sort_keys=True))
  row = {'event': 'start', 'time': _now(), 'host': socket.gethostname(), 'pid': os.getpid(),
         'start_step': int(start_step), 'num_steps': int(config.train.num_steps)}
  if changed:
    row['changed'] = {k: list(v) for k, v in changed.items()}
  append_history(workdir, row)


def append_history(workdir: str, row: dict) -> None:
  with open(os.path.join(workdir, HISTORY), 'a') as f:
    f.write(json.dumps(row) + '\n')


def _now() -> str:
  return time.strftime('%Y-%m-%dT%H:%M:%S%z')


# ---------------------------------------------------------------------------------------------
# Metrics.


def read_metrics_rows(workdir: str) -> list[dict]:
  """metrics.jsonl rows; a torn last line (a run killed while writing it) is skipped."""
  rows = []
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and 'step' in row:
        rows.append(row)
  return rows


def truncate_metrics(workdir: str, step: int) -> int:
  """Keeps the metrics.jsonl rows of steps <= `step` (the restored checkpoint): the steps a
  killed run logged after its last checkpoint are trained again and logged again. Returns the
  number of rows dropped."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep, dropped = [], 0
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      dropped += 1
      continue
    if isinstance(row, dict) and int(row.get('step', 0)) <= step:
      keep.append(line if line.endswith('\n') else line + '\n')
    else:
      dropped += 1
  if dropped:
    _write_atomic(path, ''.join(keep))
  return dropped


def final_metrics(workdir: str) -> dict | None:
  return _read_json(os.path.join(workdir, FINAL))


def write_final_metrics(workdir: str, metrics: dict) -> None:
  _write_atomic(os.path.join(workdir, FINAL), json.dumps(metrics, indent=1))


def metrics_at(workdir: str, step: int) -> dict:
  """The logged train metrics of `step` and the eval results logged at or before it, from
  metrics.jsonl (what final_metrics.json holds when the run that reached `step` was killed
  before writing it)."""
  out: dict = {}
  for row in read_metrics_rows(workdir):
    if row['step'] == step and not any(k.startswith('eval/') for k in row):
      out.update({k: v for k, v in row.items() if k not in ('steps_per_sec',
                                                             'audio_hours_per_sec', 'data_crc')})
    elif row['step'] <= step and any(k.startswith('eval/') for k in row):
      out.update({k: v for k, v in row.items() if k != 'step'})
  out['step'] = step
  return out
