"""Loading a training workdir for prediction and evaluation: its method, model, extra state and
`EvalContext` (`load_context`), and the CTC error rates of a workdir (`evaluate_ctc`).

This module sits above `jaxspeech.train` (it restores checkpoints) and `jaxspeech.eval` (it builds
their contexts); neither imports it, so the trainer can run evaluations without an import cycle.
Used by `jaxspeech.evaluate`, `jaxspeech.extract` and `jaxspeech.demo`.
"""

from __future__ import annotations

import os

import jax

from jaxspeech.eval.asr import ctc_error_rates
from jaxspeech.eval.common import encoder_context, mfcc_context
from jaxspeech.eval.registry import EvalContext, EvalError
from jaxspeech.train.checkpoint import load_workdir_model


def restore_extra(workdir: str, abstract_state):
  """`extra` (teacher, codebooks, pruning masks...) of a workdir's latest checkpoint, the other
  items skipped. The restore target is the configured train state's shapes with every item but
  `extra` a placeholder, so no checkpoint metadata is needed."""
  import orbax.checkpoint as ocp

  if not jax.tree.leaves(abstract_state['extra']):
    return abstract_state['extra']  # nothing to read (e.g. Spin keeps no extra state)
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'data'))
  try:
    step = mngr.latest_step()
    target = {k: jax.tree.map(lambda _: ocp.PLACEHOLDER, v) for k, v in abstract_state.items()
              if k != 'extra'}
    target['extra'] = abstract_state['extra']
    restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if hasattr(a, 'sharding')
        else ocp.RestoreArgs(), target))))
  finally:
    mngr.close()
  return restored['state']['extra']


def workdir_context(workdir: str) -> EvalContext:
  """A training workdir's method, model (latest parameters), extra state and predictions."""
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise EvalError(f'--checkpoint {workdir}: has checkpoints/ but no config.json')
  method, model, config, setup = load_workdir_model(workdir)
  extra = restore_extra(workdir, setup.abstract_state)
  # The trainer always normalises its input (`jaxspeech.train.data` calls `make_dataset` with its
  # default normalize=True; the config has no key to turn it off), so a workdir's model is too.
  return EvalContext(config=config, method=method, model=model, extra=extra,
                     predict=method.predict_fns(model, extra), normalize=True)


def load_context(checkpoint: str) -> EvalContext:
  """'mfcc', an HF checkpoint directory or a jaxspeech workdir -> its EvalContext."""
  if checkpoint == 'mfcc':
    return mfcc_context()
  if not os.path.isdir(checkpoint):
    raise EvalError(f'--checkpoint {checkpoint}: no such directory (nor "mfcc")')
  if os.path.isdir(os.path.join(checkpoint, 'checkpoints')):
    return workdir_context(checkpoint)
  if os.path.exists(os.path.join(checkpoint, 'config.json')):
    from jaxspeech.interop import hf

    return encoder_context(hf.load_encoder(checkpoint), hf.feature_extractor_normalizes(checkpoint))
  raise EvalError(f'--checkpoint {checkpoint}: neither a jaxspeech workdir (no checkpoints/) nor '
                  'an HF checkpoint directory (no config.json)')


def evaluate_ctc(checkpoint: str, manifest: str, split: str = '',
                 batch_size: int = 8) -> dict[str, float]:
  """PER (phone model) or WER + CER (character model) of greedy CTC decoding of a training
  workdir on the rows of `manifest` (only those of `split` when given): the `ctc` evaluation
  task (`ctc_error_rates`) on the workdir's context, as `python -m jaxspeech.evaluate
  --task ctc` runs it."""
  return ctc_error_rates(load_context(checkpoint), manifest, split, batch_size)
