r"""Runs a pruning method end to end: one or several fine-tuning runs of the shared trainer.

    python -m jaxspeech.prune --config experiments/parp.py:tiny \
        --workdir runs/parp_tiny --config.init_from=runs/hubert_tiny --config.prune.method=omp

`config.init_from` may be a pretraining workdir of any method (its encoder is taken from
`method.encoder_path`), an HF checkpoint folder, a CTC workdir, or '' (random encoder). The runner
first writes the run's initial parameters theta_init (pretrained encoder + the seeded CTC head)
to `WORKDIR/phases/init`, then, by `config.prune.method`:

  none / mpi / parp  one fine-tuning run in WORKDIR from theta_init (PARP and MPI prune at its
                     first step; see `jaxspeech.methods.parp`).
  omp                dense fine-tuning (`phases/dense`); m = MP(theta_ft, s); masked fine-tuning
                     in WORKDIR from m * theta_init (`prune.rewind`, lottery-ticket rewinding to
                     the pretrained weights) or from m * theta_ft.
  imp                as omp in `prune.imp_rounds` rounds: round k prunes the previous round's
                     fine-tuned weights to s_k = 1 - (1 - s)^(k / R), rewinds and fine-tunes with
                     the mask fixed; the last round runs in WORKDIR.

Every phase is a plain `train_and_evaluate(config, phase_workdir)` with `init_from` pointing at
the phase's starting parameters, so phases resume like any run. The final parameters' zero
fractions go to `WORKDIR/sparsity.json` (`{"<tensor path>": zero_fraction, ..., "global": ...}`
over the `prune.pattern` tensors) and the phases and their update counts to
`WORKDIR/prune_phases.json`.

Each phase writes the config it runs with (the keys its result depends on) to `prune_phase.json`
in its folder before it starts. A re-run with the same config resumes (finished phases are
skipped). A re-run with another config, e.g. a new `prune.sparsity`, stops before it writes
anything when a phase that already holds a checkpoint ran with other values: one line names the
phase's folder and the differing keys; the finished work is never silently reused for another
config (use a new --workdir). Keys that cannot change the weights (logging, checkpoint and eval
cadence, mesh: `UNCOMPARED`) are not compared.

User errors (a bad flag, a `--config.<key>` naming no field, a config file that does not load, a
phase that ran with another config, a checkpoint of another architecture...) print one line
`python -m jaxspeech.prune: error: ...` and exit with code 2; only a bug shows a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxspeech import errors
from jaxspeech.methods.prune_spec import FIXED_MASK, METHODS
from jaxspeech.ops import pruning

PyTree = Any
PROG = 'python -m jaxspeech.prune'
RECORD = 'prune_phase.json'  # in every phase's folder: the config the phase ran with
# Keys of a phase's training config that cannot change its parameters (logging, evaluation and
# checkpoint cadence, device layout, input workers): not compared on a re-run.
UNCOMPARED = ('mesh', 'evals', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
              'train.keep_checkpoints', 'train.async_checkpointing', 'train.kill_after_step',
              'train.allow_fallback', 'data.num_workers', 'data.cache_dir')
# What theta_init (`initial_params`) depends on.
INIT_KEYS = ('init_from', 'train.seed', 'model.', 'method.', 'data.manifest', 'data.split',
             'data.builtin_utterances')


class PruneError(errors.UserError, ValueError):
  """A flag, file or workdir the runner cannot use; the message names it."""


class PruneConfigError(errors.ConfigError, PruneError):
  """A `config.prune` setting the runner cannot use; the message starts with the key."""


class PhaseConfigError(PruneError):
  """A phase of the workdir ran with another config than the one now requested."""


def _single_device(config):
  config = copy.deepcopy(config)
  with config.unlocked():
    config.mesh.shape = {'data': 1, 'fsdp': 1, 'model': 1}
  return config


def _setup(config):
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  config = _single_device(config)
  method = get_method(config)
  mesh = partitioning.create_mesh(config.mesh, devices=jax.devices()[:1])
  return method, step_lib.build_setup(config, method, mesh)


def _read_config(workdir: str):
  import ml_collections

  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir}: no config.json (not a jaxspeech training workdir)')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
    raise PruneError(f'{path}: not a jaxspeech training config ({e})') from None


def restore_params(workdir: str, config=None, label: str | None = None) -> PyTree:
  """Latest parameters of a training workdir (its own config unless `config` is given); errors
  name it as `label` (default: `config.init_from=WORKDIR`)."""
  from jaxspeech.train import checkpoint as ckpt_lib

  workdir = os.path.abspath(workdir)
  _, setup = _setup(config if config is not None else _read_config(workdir))
  params, _ = ckpt_lib.restore_params_from_workdir(workdir, setup.abstract_state, label=label)
  return jax.tree.map(np.asarray, params)


def pretrained_encoder(src: str) -> tuple[PyTree, str]:
  """Encoder parameters of a jaxspeech workdir (any method) or an HF checkpoint folder."""
  src = os.path.abspath(src)
  if os.path.isdir(os.path.join(src, 'checkpoints')):
    cfg = _read_config(src)
    method, _ = _setup(cfg)
    node = restore_params(src, cfg)
    for k in method.encoder_path:
      node = node[k]
    return node, f'{cfg.method.name} workdir {src}'
  if os.path.exists(os.path.join(src, 'config.json')):
    from jaxspeech.interop.hf import load_hf_checkpoint
    _, enc = load_hf_checkpoint(src)
    return jax.tree.map(np.asarray, enc), f'HF checkpoint {src}'
  raise FileNotFoundError(f'config.init_from={src!r}: neither a jaxspeech workdir nor an HF '
                          'checkpoint folder')


def save_params(path: str, params: PyTree) -> None:
  """Writes `params` as step 0 of a workdir that `config.init_from` can start from."""
  from jaxspeech.train import checkpoint as ckpt_lib

  ckpt = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(path), 'checkpoints'),
                               max_to_keep=1, async_save=False)
  try:
    ckpt.save(0, {'params': params}, force=True)
  finally:
    ckpt.close()


def initial_params(config) -> PyTree:
  """theta_init: the seeded model with the pretrained encoder of `config.init_from` (if any)."""
  from jaxspeech.train import checkpoint as ckpt_lib
  from jaxspeech.train import step as step_lib

  method, setup = _setup(config)
  state = step_lib.create_train_state(setup, jax.random.key(int(config.train.seed)))
  params = state['params']
  src = str(config.init_from)
  if src:
    enc, what = pretrained_encoder(src)
    node = params
    for k in method.encoder_path:
      node = node[k]
    missing = {k: np.asarray(node[k]) for k in ('masked_spec_embed',) if k not in enc}
    params = ckpt_lib.merge_subtree(params, tuple(method.encoder_path), {**enc, **missing},
                                    f'config.init_from={src!r} ({what})')
  return jax.tree.map(np.asarray, params)


def _phase_config(config, init_dir: str, method: str, sparsity: float):
  c = copy.deepcopy(config)
  with c.unlocked():
    c.init_from = os.path.abspath(init_dir)
    c.prune.method = method
    c.prune.sparsity = float(sparsity)
  return c


def _done(workdir: str) -> bool:
  """Whether `workdir` holds a complete checkpoint (Orbax renames a step's temporary folder to
  its number when the save is complete)."""
  d = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _train(config, workdir: str) -> dict:
  """Trains a phase, or reads its final metrics when its last checkpoint exists already (a
  finished phase is not re-entered: e.g. the sweep shares one dense run among OMP runs; that it
  ran with this config is checked by `check_phases` first)."""
  from jaxspeech.train.trainer import train_and_evaluate
  last = os.path.join(workdir, 'checkpoints', str(int(config.train.num_steps)))
  final = os.path.join(workdir, 'final_metrics.json')
  if os.path.isdir(last) and os.path.exists(final):
    logging.info('prune_runner: %s is finished; not re-run', workdir)
    with open(final) as f:
      return json.load(f)
  logging.info('prune_runner: %s phase (sparsity %.3f) in %s', config.prune.method,
               float(config.prune.sparsity), workdir)
  return train_and_evaluate(config, workdir)


def sparsity_report(params: PyTree, pattern: str) -> dict[str, float]:
  return {k: float(v) for k, v in pruning.sparsity_stats(params, pattern).items()}


# ---------------------------------------------------------------------------------------------
# The phases of a run and the config each ran with.


@dataclasses.dataclass
class Phase:
  """One phase: 'init' (theta_init), 'mask' (a start point m * theta of a masked phase) or
  'train' (a fine-tuning run). `record` is what its result depends on (flat config keys), written
  to `workdir/RECORD` when the phase starts and compared on every re-run."""
  kind: str
  workdir: str
  method: str
  sparsity: float
  record: dict
  config: Any = None  # 'train': the phase's training config
  source: str = ''  # 'mask': the fine-tuned phase whose weights are pruned


def flatten(tree, prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf} of a nested dict (a ConfigDict's `to_dict()`)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _jsonable(record: dict) -> dict:
  """As read back from JSON (tuples -> lists), so a fresh record compares equal to a stored one."""
  return json.loads(json.dumps(record, sort_keys=True, default=str))


def _matches(key: str, prefixes) -> bool:
  return any(key == p or key.startswith(p if p.endswith('.') else p + '.') for p in prefixes)


def _train_record(config, root: str) -> dict:
  flat = flatten(config.to_dict())
  method = str(config.prune.method)
  rec = {k: v for k, v in flat.items() if not _matches(k, UNCOMPARED)}
  rec['init_from'] = os.path.relpath(str(config.init_from), root)  # a phase of this workdir
  drop = ['prune.imp_rounds', 'prune.rewind']  # recorded by the 'mask' phases
  if method != 'parp':
    drop.append('prune.every')
  if method == 'none':
    drop += ['prune.pattern', 'prune.scope']
  return _jsonable({k: v for k, v in rec.items() if k not in drop})


def plan(config, workdir: str) -> list[Phase]:
  """Every phase of `config.prune.method` in `workdir` (absolute), in order, with its record."""
  method = str(config.prune.method)
  if method not in METHODS:
    raise PruneConfigError(f'config.prune.method={method!r}: choose one of {METHODS}')
  s = float(config.prune.sparsity)
  if not 0.0 <= s < 1.0:
    raise PruneConfigError(f'config.prune.sparsity={s}: must be in [0, 1)')
  phases_dir = os.path.join(workdir, 'phases')
  init_dir = os.path.join(phases_dir, 'init')
  flat = flatten(config.to_dict())
  init_rec = {k: v for k, v in flat.items() if _matches(k, INIT_KEYS)}
  init_rec['init_from'] = os.path.abspath(str(config.init_from)) if config.init_from else ''
  out = [Phase('init', init_dir, 'none', 0.0, _jsonable(init_rec))]

  def train(run_dir, start_dir, m, sparsity):
    cfg = _phase_config(config, start_dir, m, sparsity)
    out.append(Phase('train', run_dir, m, sparsity, _train_record(cfg, workdir), config=cfg))

  if method in ('none', 'parp', 'mpi'):
    train(workdir, init_dir, method, s)
    return out
  rounds = 1 if method == 'omp' else int(config.prune.imp_rounds)
  if rounds < 1:
    raise PruneConfigError(f'config.prune.imp_rounds={rounds}: must be >= 1')
  assert method in FIXED_MASK
  prev = os.path.join(phases_dir, 'dense')
  train(prev, init_dir, 'none', 0.0)
  for k in range(1, rounds + 1):
    s_k = 1.0 - (1.0 - s) ** (k / rounds) if k < rounds else s
    start_dir = os.path.join(phases_dir, f'round{k}_init')
    rec = {'source': os.path.relpath(prev, workdir), 'prune.sparsity': s_k,
           'prune.rewind': bool(config.prune.rewind), 'prune.pattern': str(config.prune.pattern),
           'prune.scope': str(config.prune.scope)}
    out.append(Phase('mask', start_dir, method, s_k, _jsonable(rec), source=prev))
    run_dir = workdir if k == rounds else os.path.join(phases_dir, f'round{k}')
    train(run_dir, start_dir, method, s_k)
    prev = run_dir
  return out


def _read_record(phase_dir: str) -> dict | None:
  path = os.path.join(phase_dir, RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)['config']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise PhaseConfigError(f'{path}: unreadable phase record ({e}); use a new --workdir') from None


def _show(v) -> str:
  text = json.dumps(v)
  return text if len(text) <= 60 else text[:57] + '...'


def record_diff(old: dict, new: dict) -> list[str]:
  """The keys whose values differ between two phase records (a key only in one counts)."""
  missing = object()
  return sorted(k for k in set(old) | set(new) if old.get(k, missing) != new.get(k, missing))


def check_phases(phases: list[Phase]) -> None:
  """Raises PhaseConfigError, before anything is written, when a phase that holds a checkpoint
  ran with another config than the one requested now (its record differs: one line naming the
  keys and the phase's folder), or holds a checkpoint without a record (a workdir of an older
  runner, or another kind of run). A phase without a checkpoint has done nothing and is free."""
  for ph in phases:
    if not _done(ph.workdir):
      continue
    old = _read_record(ph.workdir)
    if old is None:
      raise PhaseConfigError(
        f'{ph.workdir}: holds checkpoints but no {RECORD} (not written by this prune runner), so '
        'the config it ran with cannot be checked; use a new --workdir')
    diff = record_diff(old, ph.record)
    if diff:
      shown = ', '.join(f'{k}: {_show(old.get(k))} -> {_show(ph.record.get(k))}'
                        for k in diff[:4])
      more = f' and {len(diff) - 4} more' if len(diff) > 4 else ''
      raise PhaseConfigError(
        f'{ph.workdir}: this {ph.kind} phase ran with another config ({shown}{more}); its results '
        'are kept as they are: use a new --workdir for the new config')


def write_record(ph: Phase, root: str) -> None:
  """`ph.workdir/RECORD` (atomically; process 0), before the phase writes anything else."""
  if jax.process_index() != 0:
    return
  os.makedirs(ph.workdir, exist_ok=True)
  path = os.path.join(ph.workdir, RECORD)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump({'phase': os.path.relpath(ph.workdir, root), 'kind': ph.kind, 'method': ph.method,
               'sparsity': ph.sparsity, 'config': ph.record}, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def run(config, workdir: str) -> dict:
  """Every phase of `config.prune.method`; returns {'sparsity': ..., 'phases': [...]}.

  Each phase records the config it runs with (`RECORD` in its folder). A re-run with the same
  config resumes: finished phases are skipped, an interrupted one resumes. A re-run with another
  config (e.g. a new `prune.sparsity`) whose phases already hold checkpoints stops before writing
  anything, with one line naming the phase's folder and the differing keys (`check_phases`)."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise PruneError(f'--workdir {workdir}: is a file')
  method = str(config.prune.method)
  s = float(config.prune.sparsity)
  phases = plan(config, workdir)
  check_phases(phases)
  init_dir = phases[0].workdir
  results, theta_init = [], None
  for ph in phases:
    if not _done(ph.workdir):
      write_record(ph, workdir)  # (re)written only while the phase holds no checkpoint
    if ph.kind == 'init':
      if not _done(ph.workdir):
        save_params(ph.workdir, initial_params(config))
    elif ph.kind == 'mask':
      if not _done(ph.workdir):
        tuned = restore_params(ph.source, _phase_config(config, init_dir, 'none', 0.0),
                               label=f'prune phase {ph.source}')
        masks = pruning.magnitude_masks(tuned, ph.sparsity, str(config.prune.pattern),
                                        str(config.prune.scope))
        if bool(config.prune.rewind):
          if theta_init is None:
            theta_init = restore_params(init_dir, config, label=f'prune phase {init_dir}')
          base = theta_init
        else:
          base = tuned
        save_params(ph.workdir, jax.tree.map(np.asarray, pruning.apply_masks(base, masks)))
    else:
      results.append({'workdir': ph.workdir, 'method': ph.method, 'sparsity': ph.sparsity,
                      'metrics': _train(ph.config, ph.workdir)})
  final = restore_params(workdir, _phase_config(config, init_dir, method, s),
                         label=f'prune run {workdir}')
  report = sparsity_report(final, str(config.prune.pattern))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'sparsity.json'), 'w') as f:
      json.dump(report, f, indent=1)
    summary = [{'workdir': p['workdir'], 'method': p['method'], 'sparsity': p['sparsity'],
                'updates': int(config.train.num_steps)} for p in results]
    with open(os.path.join(workdir, 'prune_phases.json'), 'w') as f:
      json.dump({'method': method, 'sparsity': s, 'fine_tuning_runs': len(results),
                 'phases': summary}, f, indent=1)
  logging.info('prune_runner: %s at %.3f done; measured global zero fraction %.4f', method, s,
               report['global'])
  return {'sparsity': report, 'phases': results}


# ---------------------------------------------------------------------------------------------
# The command line.


parse_flags = errors.absl_flags_parser(PROG)


def _config():
  """The parsed `--config`; a config file that failed to load is a user error naming it."""
  return errors.loaded_config(_CONFIG)


def main(argv):
  """`app.run`'s main: returns 2 after one `error:` line for a user error (`errors.run_cli`)."""
  return errors.run_cli(_main, argv, prog=PROG)


def _main(argv):
  import logging as logging_std

  if len(argv) > 1:
    raise PruneError(f'unexpected arguments: {argv[1:]}')
  if logging.get_verbosity() < 1:  # Orbax logs several INFO lines per save/restore
    logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging_std.WARNING or 'orbax' not in r.pathname)
  run(_config(), _WORKDIR.value)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'experiments/<method>.py:<variant>',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the final run.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
