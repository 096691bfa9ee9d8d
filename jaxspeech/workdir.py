"""Loading a training workdir for prediction and evaluation: its method, model, extra state and
`EvalContext` (`load_context`), and the CTC error rates of a workdir (`evaluate_ctc`).

This module sits above `jaxspeech.train` (it restores checkpoints) and `jaxspeech.eval` (it builds
their contexts); neither imports it, so the trainer can run evaluations without an import cycle.
Used by `jaxspeech.evaluate`, `jaxspeech.extract` and `jaxspeech.demo`.
"""

from __future__ import annotations

import os

import jax

from jaxspeech.errors import one_line_reason
from jaxspeech.eval.asr import ctc_error_rates
from jaxspeech.eval.common import encoder_context, mfcc_context
from jaxspeech.eval.registry import EvalContext, EvalError
from jaxspeech.train.checkpoint import load_workdir_model


def restore_extra(workdir: str, abstract_state, label: str | None = None):
  """`extra` (teacher, codebooks, pruning masks...) of a workdir's latest checkpoint, the other
  items skipped. The restore target is the configured train state's shapes with every item but
  `extra` a placeholder, so no checkpoint metadata is needed. A checkpoint that cannot be read
  (damaged files) is an EvalError naming the workdir as `label` and the root cause, in one line."""
  import grain
  import orbax.checkpoint as ocp

  if not jax.tree.leaves(abstract_state['extra']):
    return abstract_state['extra']  # nothing to read (e.g. Spin keeps no extra state)
  label = label or f'--checkpoint {workdir}'
  # Both items' handlers registered: Orbax warns about an item it has no handler for.
  mngr = ocp.CheckpointManager(
    os.path.join(workdir, 'checkpoints'), item_names=('state', 'data'),
    item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                   'data': grain.checkpoint.CheckpointHandler()})
  step = None
  try:
    step = mngr.latest_step()
    target = {k: jax.tree.map(lambda _: ocp.PLACEHOLDER, v) for k, v in abstract_state.items()
              if k != 'extra'}
    target['extra'] = abstract_state['extra']
    restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if hasattr(a, 'sharding')
        else ocp.RestoreArgs(), target))))
  except Exception as e:  # noqa: BLE001 -- Orbax / TensorStore errors of a damaged checkpoint
    raise EvalError(f'{label}: checkpoint {step} cannot be read ({one_line_reason(e)})') from e
  finally:
    mngr.close()
  return restored['state']['extra']


def check_workdir_config(workdir: str, label: str) -> None:
  """EvalError naming `label` unless `workdir/config.json` exists and is a JSON object (checked
  before a loader trips over it with a traceback)."""
  import json

  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise EvalError(f'{label}: has checkpoints/ but no config.json')
  try:
    with open(path, 'rb') as f:
      config = json.loads(f.read().decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise EvalError(f'{label}: {path} is not valid JSON ({e})') from None
  if not isinstance(config, dict) or not isinstance(config.get('method'), dict):
    raise EvalError(f'{label}: {path} is not a jaxspeech training config (no `method`)')


def workdir_context(workdir: str, label: str | None = None) -> EvalContext:
  """A training workdir's method, model (latest parameters), extra state and predictions.
  `label` names the workdir in errors as the user gave it (default `--checkpoint WORKDIR`)."""
  label = label or f'--checkpoint {workdir}'
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths
  check_workdir_config(workdir, label)
  method, model, config, setup = load_workdir_model(workdir, label=label)
  extra = restore_extra(workdir, setup.abstract_state, label)
  # Inputs scaled as the trainer fed them (`config.data.normalize`; workdirs from before the key
  # existed were always 'standard').
  return EvalContext(config=config, method=method, model=model, extra=extra,
                     predict=method.predict_fns(model, extra),
                     normalize=str(config.data.get('normalize', 'standard')),
                     opener=load_context)


def load_context(checkpoint: str, label: str | None = None,
                 mfcc_input_scale: str | None = None) -> EvalContext:
  """'mfcc', an HF checkpoint directory or a jaxspeech workdir -> its EvalContext. Errors name
  the source as `label` (default `--checkpoint CHECKPOINT`, as the CLIs take it): never a config
  key the user did not set. An HF folder's errors name its files. `mfcc_input_scale` ('fairseq',
  the default, or 'kaldi'; `jaxspeech.methods.hubert.MFCC_INPUT_SCALES`) applies to 'mfcc' only
  and is an error with any other checkpoint."""
  label = label or f'--checkpoint {checkpoint}'
  if checkpoint == 'mfcc':
    return mfcc_context(mfcc_input_scale or 'fairseq')
  if mfcc_input_scale is not None:
    raise EvalError(f'--mfcc_input_scale applies to --checkpoint mfcc only, not {checkpoint}')
  if not os.path.isdir(checkpoint):
    raise EvalError(f'{label}: no such directory (nor "mfcc")')
  if os.path.isdir(os.path.join(checkpoint, 'checkpoints')):
    return workdir_context(checkpoint, label)
  if os.path.exists(os.path.join(checkpoint, 'config.json')):
    from jaxspeech.interop import hf

    return encoder_context(hf.load_encoder(checkpoint), hf.feature_extractor_normalizes(checkpoint))
  raise EvalError(f'{label}: neither a jaxspeech workdir (no checkpoints/) nor an HF checkpoint '
                  'directory (no config.json)')


def evaluate_ctc(checkpoint: str, manifest: str, split: str = '',
                 batch_size: int = 8) -> dict[str, float]:
  """PER (phone model) or WER + CER (character model) of greedy CTC decoding of a training
  workdir on the rows of `manifest` (only those of `split` when given): the `ctc` evaluation
  task (`ctc_error_rates`) on the workdir's context, as `python -m jaxspeech.evaluate
  --task ctc` runs it."""
  return ctc_error_rates(load_context(checkpoint), manifest, split, batch_size)
