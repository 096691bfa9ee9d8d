"""`train_and_evaluate(config, workdir)`: the one training loop every method runs through.

    method = get_method(config)                       # jaxspeech/methods/<name>.py
    mesh   = create_mesh(config.mesh)                 # ('data', 'fsdp', 'model')
    setup  = build_setup(config, method, mesh)        # shapes + shardings, nothing allocated
    state  = restore_or_init(...)                     # workdir ckpt -> config.init_from -> scratch
    for step in range(start, num_steps):
      batch = global arrays from the host's Grain batch
      state, metrics = train_step(state, batch)       # jax.jit, shardings, donation
      non-finite guard, clu averages, metrics.jsonl, progress line, Orbax save (+ data iterator)
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import zlib
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxspeech import errors
from jaxspeech.errors import ConfigError
from jaxspeech.eval import registry as eval_registry
from jaxspeech.methods.base import Method, Pretrained, get_method
from jaxspeech.train import checkpoint as ckpt_lib
from jaxspeech.train import data as data_lib
from jaxspeech.train import metrics as metrics_lib
from jaxspeech.train import partitioning
from jaxspeech.train import step as step_lib
from jaxspeech.train import workdir_contract as contract

PyTree = Any


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or norm; the message names the step."""


def _check_finite(step: int, host_metrics: dict[str, float], last_ckpt: int | None) -> None:
  bad = {k: v for k, v in host_metrics.items()
         if k in ('loss', 'grad_norm', 'param_norm') and not math.isfinite(v)}
  if bad:
    vals = ', '.join(f'{k}={host_metrics[k]!r}' for k in ('loss', 'grad_norm', 'param_norm')
                     if k in host_metrics)
    raise NonFiniteError(
      f'Non-finite {"/".join(sorted(bad))} at step {step} ({vals}); training stopped. '
      f'Last checkpoint: {"none" if last_ckpt is None else f"step {last_ckpt}"}. Check the '
      'input batch of this step (NaN/inf audio), the learning rate and config.optim.clip_norm.')


def _workdir_method(workdir: str) -> str | None:
  """`method.name` of a training workdir's saved config (None when it has no config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get('method', {}).get('name')


def pretrained_source(src: str) -> Pretrained:
  """`config.init_from` -> a `Pretrained` source: an HF checkpoint folder or a jaxspeech workdir
  (its encoder loaded on demand through its own method's `encoder` hook)."""
  if not os.path.exists(src):
    raise FileNotFoundError(f'config.init_from={src!r}: no such file or directory')
  if os.path.isdir(os.path.join(src, 'checkpoints')):
    def workdir_encoder():
      from flax import nnx

      src_method, model, _, _ = ckpt_lib.load_workdir_model(src)
      enc = src_method.encoder(model)
      if enc is None:
        raise ConfigError(f'config.init_from={src!r}: its {src_method.name} model has no speech '
                          'encoder')
      return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(enc, nnx.Param)))

    return Pretrained(src, 'workdir', _workdir_method(src), workdir_encoder)
  if os.path.exists(os.path.join(src, 'config.json')):
    def hf_encoder():
      from jaxspeech.interop.hf import load_hf_checkpoint

      return load_hf_checkpoint(src)[1]

    return Pretrained(src, 'hf', None, hf_encoder)
  raise FileNotFoundError(f'config.init_from={src!r} is neither a jaxspeech workdir (no '
                          'checkpoints/) nor an HF checkpoint folder (no config.json)')


def _load_init_from(config, method: Method, setup: step_lib.TrainSetup, state: PyTree) -> PyTree:
  """A workdir of this same method: all its parameters; anything else: `method.load_pretrained`
  (default: its speech encoder)."""
  source = pretrained_source(str(config.init_from))
  if source.kind == 'workdir' and source.method_name in (None, method.name):
    params, step = ckpt_lib.restore_params_from_workdir(source.path, setup.abstract_state)
    logging.info('config.init_from: parameters of %s at step %d', source.path, step)
    return dict(state, params=params)
  params = method.load_pretrained(state['params'], source)
  logging.info('config.init_from: %s (%s%s) via %s.load_pretrained', source.path, source.kind,
               f', method {source.method_name}' if source.method_name else '',
               type(method).__name__)
  return dict(state, params=params)


def _place(tree: PyTree, shardings: PyTree) -> PyTree:
  """`device_put` onto global shardings. Multi-host: arrays this host holds whole (host values,
  single-device results of host-side set-up) go through numpy, so each host contributes its
  shards of the same value; arrays that already span hosts are resharded by `device_put`."""
  if jax.process_count() > 1:
    tree = jax.tree.map(
      lambda x: np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else x,
      tree)
  return jax.device_put(tree, shardings)


HOST_STATE = 'host_state.json'


def bind_host_state(config, method: Method, workdir: str, write: bool = True) -> dict:
  """`Method.fit_host_state` on the training rows the first time (written to
  WORKDIR/host_state.json), read back on every later start; then `method.set_host_state`."""
  path = os.path.join(workdir, HOST_STATE)
  if os.path.exists(path):
    with open(path) as f:
      host_state = json.load(f)
  else:
    host_state = method.fit_host_state(data_lib.manifest_rows(config.data, method))
    if write and host_state:
      tmp = path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(host_state, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
  method.set_host_state(host_state)
  return host_state


_ORBAX_READ_ERROR = 'Encountered error while reading array index'


def _silence_abandoned_reads() -> None:
  """When a checkpoint fails to restore, Orbax's other reads of the damaged files finish as
  never-awaited coroutines, unretrieved asyncio futures and callbacks into a closed event loop,
  each printing a traceback (some with a 60-line TensorStore spec). The failure is reported in
  one line; these filters drop only reports of that signature (idempotent)."""
  import logging as logging_std
  import sys

  def abandoned(exc) -> bool:
    if exc is None:
      return False
    text = f'{exc} {exc.__cause__ or ""}'
    return (isinstance(exc, GeneratorExit) or _ORBAX_READ_ERROR in text
            or 'Event loop is closed' in text or ('OUT_OF_RANGE' in text and 'OCDBT' in text))

  hook = sys.unraisablehook
  if not getattr(hook, '_jaxspeech_quiet', False):
    def quiet_hook(unraisable, _prev=hook):
      if not abandoned(unraisable.exc_value):
        _prev(unraisable)
    quiet_hook._jaxspeech_quiet = True
    sys.unraisablehook = quiet_hook
  aio = logging_std.getLogger('asyncio')
  if not any(getattr(f, '_jaxspeech_quiet', False) for f in aio.filters):
    class _Quiet(logging_std.Filter):
      _jaxspeech_quiet = True

      def filter(self, record):
        return 'exception was never retrieved' not in record.getMessage() and not abandoned(
          record.exc_info[1] if record.exc_info else None)
    aio.addFilter(_Quiet())


def _restore_latest_intact(config, setup: step_lib.TrainSetup,
                           checkpointer: ckpt_lib.Checkpointer, train_iter,
                           workdir: str) -> tuple[PyTree, int] | None:
  """The newest checkpoint that restores. An unreadable one is reported in one line; with
  `config.train.allow_fallback` it is moved to WORKDIR/corrupt_checkpoints/ and the next older
  step is tried, without it the run stops (WorkdirError). None when there is no checkpoint."""
  allow = bool(config.train.get('allow_fallback', True))
  if checkpointer.latest_step() is not None:
    _silence_abandoned_reads()  # armed before the attempt: the stragglers print right away
  while (latest := checkpointer.latest_step()) is not None:
    try:
      state = checkpointer.restore(latest, setup.abstract_state, train_iter)
    except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many types for bad files
      reason = contract.one_line_reason(e)
      older = [s for s in contract.checkpoint_steps(workdir) if s < latest]
      if not allow or jax.process_count() > 1:
        raise contract.WorkdirError(
          f'{workdir}: checkpoint step {latest} cannot be restored ({reason}); '
          + (f'set --config.train.allow_fallback=true to resume from step {older[-1]}'
             if older else 'no older checkpoint to fall back to')) from e
      if not older:
        raise contract.WorkdirError(
          f'{workdir}: checkpoint step {latest} cannot be restored ({reason}) and there is no '
          'older one; move it away to start from scratch') from e
      moved = checkpointer.quarantine(latest, os.path.join(workdir, contract.CORRUPT))
      logging.warning('Checkpoint step %d cannot be restored (%s); moved to %s, falling back to '
                      'step %d', latest, reason, moved, older[-1])
      contract.append_history(workdir, {'event': 'fallback', 'corrupt_step': int(latest),
                                        'moved_to': moved, 'reason': reason})
      continue
    logging.info('Resuming from %s step %d', checkpointer.directory, latest)
    return state, int(latest)
  return None


def restore_or_init(config, method: Method, setup: step_lib.TrainSetup,
                    checkpointer: ckpt_lib.Checkpointer, train_iter,
                    workdir: str | None = None) -> tuple[PyTree, int]:
  """Resume order: this workdir's newest intact checkpoint -> `config.init_from` -> scratch."""
  restored = _restore_latest_intact(config, setup, checkpointer, train_iter,
                                    workdir or os.path.dirname(str(checkpointer.directory)))
  if restored is not None:
    return restored
  state = step_lib.create_train_state(setup, jax.random.key(int(config.train.seed)))
  # Method-specific set-up on the data (e.g. HuBERT's k-means targets) from a separate iterator,
  # so that the training data order does not depend on it.
  # Every host reads the same whole global batches here, so that all hosts compute the same
  # extra state (a multi-host device_put assumes identical values on every host).
  prep_iter = data_lib.make_iterator(config, setup.mesh, method=method, seed_offset=1,
                                     whole_batch=True)
  extra = method.prepare(state['extra'], prep_iter)
  extra = _place(extra, setup.state_shardings['extra'])
  state = dict(state, extra=extra)
  if config.init_from:
    state = _load_init_from(config, method, setup, state)
  return state, 0


def run_evals_on_state(config, method: Method, setup: step_lib.TrainSetup, state: PyTree,
                       todo: dict) -> dict[str, float]:
  """`config.evals` entries `todo` on the current parameters (the model re-assembled from the
  train state; nothing is copied to the host but the tasks' results)."""
  from flax import nnx

  if jax.process_count() > 1:
    raise NotImplementedError('evaluation during training runs single-process only; run '
                              '`python -m jaxspeech.evaluate` on the workdir instead')
  model = nnx.merge(setup.graphdef, state['params'], state['model_state'])
  ctx = eval_registry.EvalContext(config=config, method=method, model=model,
                                  extra=state['extra'],
                                  predict=method.predict_fns(model, state['extra']))
  return eval_registry.run_evals(ctx, todo)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) under the workdir contract
  (`jaxspeech/train/workdir_contract.py`: one run at a time, an immutable config, every step
  logged once, the last step checkpointed). Returns the last logged metrics (window averages)
  and evaluation results."""
  existed = os.path.isdir(os.path.abspath(workdir))
  workdir = contract.prepare(workdir)
  contract.check_config(workdir, config)  # a refused config leaves even the lock file as it was
  is_main = jax.process_index() == 0
  lock = contract.WorkdirLock(workdir).acquire() if is_main else None
  try:
    return _train_and_evaluate(config, workdir, is_main)
  except BaseException as e:
    if not errors.is_user_error(e):
      raise
    if lock is not None:
      lock.release()
      lock = None
      if not existed:  # refused before it wrote anything: leave no empty workdir behind
        contract.remove_if_only_lock(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir: str, is_main: bool) -> dict[str, float]:
  num_steps = int(config.train.num_steps)
  log_every = max(int(config.train.log_every), 1)
  ckpt_every = int(config.train.checkpoint_every)
  if num_steps < 1:
    raise contract.WorkdirError(f'config.train.num_steps={num_steps}: must be >= 1')
  if ckpt_every < 0:
    raise contract.WorkdirError(f'config.train.checkpoint_every={ckpt_every}: must be >= 0 '
                                '(0 = only the last step)')
  changed = contract.check_config(workdir, config)  # again, under the lock
  steps = contract.checkpoint_steps(workdir)
  if steps and steps[-1] == num_steps:
    done_before = contract.final_metrics(workdir)
    if done_before is None:  # killed between the last save and final_metrics.json
      done_before = contract.metrics_at(workdir, num_steps)
      if is_main:
        contract.write_final_metrics(workdir, done_before)
    logging.info('%s: already trained to step %d (train.num_steps); nothing to do', workdir,
                 num_steps)
    return {k: v for k, v in done_before.items() if k != 'step'}

  method = get_method(config)
  # Every audio file of the training rows, checked now (cached by size and mtime in the workdir):
  # a missing, truncated or resampled file stops the run here, with its manifest line.
  n_checked = data_lib.verify_training_data(config, method, cache_dir=workdir if is_main else None)
  logging.info('Data: %d audio files checked', n_checked)
  bind_host_state(config, method, workdir, write=is_main)
  mesh = partitioning.create_mesh(config.mesh)
  logging.info('Mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size,
               jax.process_count())
  setup = step_lib.build_setup(config, method, mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state['params']))
  n_train = sum(int(np.prod(x.shape)) for x, t in zip(
    jax.tree.leaves(setup.abstract_state['params']), jax.tree.leaves(setup.trainable)) if t)
  logging.info('%s: %.2fM parameters, %.2fM trainable', method.name, n_params / 1e6,
               n_train / 1e6)

  train_iter = data_lib.make_iterator(config, mesh, method=method, seed_offset=0)
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'), max_to_keep=int(config.train.keep_checkpoints),
    async_save=bool(config.train.async_checkpointing))
  try:
    state, start = restore_or_init(config, method, setup, checkpointer, train_iter, workdir)
  except BaseException:
    checkpointer.close()
    raise
  last_ckpt = checkpointer.latest_step()
  if is_main:
    contract.record_start(workdir, config, start, changed)
    dropped = contract.truncate_metrics(workdir, start)
    if dropped:
      logging.info('metrics.jsonl: %d rows after the restored step %d dropped (those steps run '
                   'again)', dropped, start)

  train_step = None  # jitted at the first batch, whose keys/ranks fix the input shardings
  logger = metrics_lib.MetricsLogger(workdir, num_steps, enabled=is_main)
  window = metrics_lib.WindowAverages()
  last_logged: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  pending = None  # (step, device metrics) of the previous step: checked one step late so the
  # host never waits on the step it just dispatched.
  window_audio_s = 0.0
  window_crc = 0  # CRC32 of the window's batches (utterance indices + crop offsets): data order
  logger.start(start)
  t_first = None

  def drain(pending_item):
    nonlocal window_audio_s
    s, dev_metrics = pending_item
    host = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
    _check_finite(s, host, last_ckpt)
    window_audio_s += host.get('audio_seconds', 0.0)
    window.update(host)
    return s

  try:
    for step in range(start, num_steps):
      host_batch = next(train_iter)
      for k in ('index', 'offset'):
        if k in host_batch:
          window_crc = zlib.crc32(np.ascontiguousarray(host_batch[k]).tobytes(), window_crc)
      batch = data_lib.to_global(host_batch, setup.mesh,
                                 data_lib.batch_spec_for(method, config, host_batch))
      if train_step is None:
        train_step = step_lib.jit_train_step(setup, batch)
      with jax.transfer_guard('disallow'):
        state, dev_metrics = train_step(state, batch)
      if t_first is None:
        t_first = time.perf_counter()
      done = step + 1
      if pending is not None:
        drain(pending)
      pending = (done, dev_metrics)
      if done % log_every == 0 or done == num_steps or (ckpt_every and done % ckpt_every == 0):
        drain(pending)
        pending = None
        if done % log_every == 0 or done == num_steps:
          last_logged = window.compute_and_reset()
          line = logger.write(done, last_logged, window_audio_s, extra={'data_crc': window_crc})
          window_audio_s, window_crc = 0.0, 0
          if is_main:
            logging.info('%s', line)
        if done == num_steps or (ckpt_every and done % ckpt_every == 0):
          checkpointer.save(done, state, train_iter, force=True)
          last_ckpt = done
      todo = eval_registry.due(config, done, num_steps)
      if todo:
        results = run_evals_on_state(config, method, setup, state, todo)
        line = logger.write_eval(done, results)
        last_eval.update(results)
        if is_main:
          logging.info('%s', line)
      kill_after = int(config.train.kill_after_step)
      if kill_after and done == kill_after:
        checkpointer.wait()
        logging.warning('config.train.kill_after_step=%d: SIGKILL (fault injection)', done)
        os.kill(os.getpid(), signal.SIGKILL)
    if pending is not None:
      drain(pending)
  finally:
    checkpointer.close()
    logger.close()
  if is_main:
    contract.write_final_metrics(workdir, {'step': num_steps, **last_logged, **last_eval})
  return {**last_logged, **last_eval}
