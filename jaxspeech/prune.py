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
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxspeech.methods.prune_spec import FIXED_MASK, METHODS
from jaxspeech.ops import pruning

PyTree = Any


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
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, config=None) -> PyTree:
  """Latest parameters of a training workdir (its own config unless `config` is given)."""
  from jaxspeech.train import checkpoint as ckpt_lib

  workdir = os.path.abspath(workdir)
  _, setup = _setup(config if config is not None else _read_config(workdir))
  params, _ = ckpt_lib.restore_params_from_workdir(workdir, setup.abstract_state)
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


def _done(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, 'checkpoints'))


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


def _train(config, workdir: str) -> dict:
  """Trains a phase, or reads its final metrics when its last checkpoint exists already (a
  finished phase is not re-entered: e.g. the sweep shares one dense run among OMP runs)."""
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


def run(config, workdir: str) -> dict:
  """Every phase of `config.prune.method`; returns {'sparsity': ..., 'phases': [...]}."""
  workdir = os.path.abspath(workdir)
  method = str(config.prune.method)
  if method not in METHODS:
    raise ValueError(f'config.prune.method={method!r}: choose one of {METHODS}')
  s = float(config.prune.sparsity)
  phases_dir = os.path.join(workdir, 'phases')
  init_dir = os.path.join(phases_dir, 'init')
  if not _done(init_dir):
    save_params(init_dir, initial_params(config))
  phases = []
  if method in ('none', 'parp', 'mpi'):
    cfg = _phase_config(config, init_dir, method, s)
    phases.append({'workdir': workdir, 'method': method, 'sparsity': s,
                   'metrics': _train(cfg, workdir)})
  else:
    rounds = 1 if method == 'omp' else int(config.prune.imp_rounds)
    if rounds < 1:
      raise ValueError(f'config.prune.imp_rounds={rounds}: must be >= 1')
    prev = os.path.join(phases_dir, 'dense')
    cfg = _phase_config(config, init_dir, 'none', 0.0)
    phases.append({'workdir': prev, 'method': 'none', 'sparsity': 0.0,
                   'metrics': _train(cfg, prev)})
    theta_init = None
    for k in range(1, rounds + 1):
      s_k = 1.0 - (1.0 - s) ** (k / rounds) if k < rounds else s
      start_dir = os.path.join(phases_dir, f'round{k}_init')
      run_dir = workdir if k == rounds else os.path.join(phases_dir, f'round{k}')
      if not _done(start_dir):
        tuned = restore_params(prev, _phase_config(config, init_dir, 'none', 0.0))
        masks = pruning.magnitude_masks(tuned, s_k, str(config.prune.pattern),
                                        str(config.prune.scope))
        if bool(config.prune.rewind):
          if theta_init is None:
            theta_init = restore_params(init_dir, config)
          base = theta_init
        else:
          base = tuned
        save_params(start_dir, jax.tree.map(np.asarray, pruning.apply_masks(base, masks)))
      assert method in FIXED_MASK
      cfg = _phase_config(config, start_dir, method, s_k)
      phases.append({'workdir': run_dir, 'method': method, 'sparsity': s_k,
                     'metrics': _train(cfg, run_dir)})
      prev = run_dir
  final = restore_params(workdir, _phase_config(config, init_dir, method, s))
  report = sparsity_report(final, str(config.prune.pattern))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'sparsity.json'), 'w') as f:
      json.dump(report, f, indent=1)
    summary = [{'workdir': p['workdir'], 'method': p['method'], 'sparsity': p['sparsity'],
                'updates': int(config.train.num_steps)} for p in phases]
    with open(os.path.join(workdir, 'prune_phases.json'), 'w') as f:
      json.dump({'method': method, 'sparsity': s, 'fine_tuning_runs': len(phases),
                 'phases': summary}, f, indent=1)
  logging.info('prune_runner: %s at %.3f done; measured global zero fraction %.4f', method, s,
               report['global'])
  return {'sparsity': report, 'phases': phases}


def main(argv):
  import logging as logging_std

  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if logging.get_verbosity() < 1:  # Orbax logs several INFO lines per save/restore
    logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging_std.WARNING or 'orbax' not in r.pathname)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'experiments/<method>.py:<variant>',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the final run.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
