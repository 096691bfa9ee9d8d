"""One registry of evaluation tasks, run from the CLI and during training (big_vision's
`config.evals` pattern).

    config.evals.<name> = {task: 'classification', every: 100, split: 'test', ...task args}

`task` names a module `jaxspeech/eval/<task>.py` that defines

    def run(ctx: EvalContext, **args) -> dict[str, float]

The trainer runs every entry at steps where `step % every == 0` (`every` defaults to
`config.train.eval_every`; 0 = never) and at the last step, and logs `eval/<name>/<metric>` to
metrics.jsonl and TensorBoard. `python -m jaxspeech.evaluate --task T` runs the same functions on
a workdir. Tasks reach the model only through `ctx.predict` (`Method.predict_fns`), never through
method names or `hasattr`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import Any

from jaxspeech.errors import ConfigError, UserError

PyTree = Any


class EvalError(UserError):
  """A user-facing evaluation error (bad input, a task the model cannot do)."""


@dataclasses.dataclass
class EvalContext:
  """What a task sees: the run's config and method, the model + extra state, and the method's
  prediction functions (`Method.predict_fns`). `normalize`: how the audio predictions take every
  utterance before padding (`jaxspeech.audio.scale_waveform`: True / 'standard' zero mean, unit
  variance, what the SSL training pipeline feeds; 'peak' for synthesis models; False / 'none' for
  raw waveforms: the MFCC baseline, HF folders with `do_normalize: false`). `opener`: how a task
  opens another checkpoint (the `tts` task's judge and vocoder): `jaxspeech.workdir.load_context`
  for contexts it made (the evaluation package does not import the loader: it imports us)."""

  config: Any
  method: Any
  model: Any
  extra: PyTree
  predict: dict[str, Callable]
  normalize: bool | str = True
  opener: Callable[..., EvalContext] | None = None

  def open(self, checkpoint: str, label: str) -> EvalContext:
    """Another checkpoint's context (`label` names it in errors, e.g. '--judge DIR')."""
    if self.opener is None:
      raise EvalError(f'{label}: this evaluation cannot open other checkpoints (run it with '
                      '`python -m jaxspeech.evaluate`)')
    return self.opener(checkpoint, label=label)

  def need(self, kind: str) -> Callable:
    if kind not in self.predict:
      raise EvalError(f'the {self.method.name} model has no {kind!r} prediction (it offers '
                      f'{sorted(self.predict)}; Method.predict_fns)')
    return self.predict[kind]

  def rows(self, split: str = '', manifest: str = '') -> list[dict]:
    """Rows of `manifest` (default: the run's `config.data.manifest` / default manifest) of
    `split` ('' = the run's configured split)."""
    import copy

    import ml_collections

    config = ml_collections.ConfigDict(copy.deepcopy(self.config.to_dict()))
    if manifest:
      config.data.manifest = manifest
    if split:
      config.data.split = split
    method = copy.copy(self.method)
    method.config = config
    return method.training_rows()


def task_module(task: str):
  if not re.fullmatch(r'[a-z][a-z0-9_]*', task):
    raise EvalError(f'evaluation task {task!r} is not a valid name')
  try:
    module = importlib.import_module(f'jaxspeech.eval.{task}')
  except ModuleNotFoundError as e:
    if e.name != f'jaxspeech.eval.{task}':
      raise
    raise EvalError(f'evaluation task {task!r}: no module jaxspeech/eval/{task}.py') from e
  if not callable(getattr(module, 'run', None)):
    raise EvalError(f'jaxspeech/eval/{task}.py has no run(ctx, **args)')
  return module


def run_task(ctx: EvalContext, task: str, **args) -> dict[str, float]:
  return {k: float(v) for k, v in task_module(task).run(ctx, **args).items()}


def entries(config) -> dict[str, dict]:
  """`config.evals` as {name: {task, every, args...}} (empty when the config has none)."""
  evals = config.get('evals', None)
  if not evals:
    return {}
  default_every = int(config.train.get('eval_every', 0) or 0)
  out = {}
  for name, e in evals.items():
    e = dict(e.to_dict() if hasattr(e, 'to_dict') else e)
    if 'task' not in e:
      raise ConfigError(f'config.evals.{name}: no `task`')
    e['every'] = int(e.get('every', default_every) or 0)
    out[name] = e
  return out


def due(config, step: int, last_step: int) -> dict[str, dict]:
  return {n: e for n, e in entries(config).items()
          if e['every'] > 0 and (step % e['every'] == 0 or step == last_step)}


def run_evals(ctx: EvalContext, todo: dict[str, dict]) -> dict[str, float]:
  """Runs `todo` ({name: entry}); returns {'eval/<name>/<metric>': value}."""
  out = {}
  for name, e in todo.items():
    args = {k: v for k, v in e.items() if k not in ('task', 'every')}
    for k, v in run_task(ctx, e['task'], **args).items():
      out[f'eval/{name}/{k}'] = v
  return out
