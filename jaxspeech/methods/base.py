"""The contract between a training method and the one shared train step.

A method is a small class built from the experiment config. It contributes

* `init(rng) -> (model, extra_state)`: the trainable NNX module (its `nnx.Param`s are what the
  optimizer updates) and a pytree of non-trainable state the loss needs and may update (EMA
  teachers, k-means codebooks, pruning masks...). Called under `jax.eval_shape` and `jax.jit`, so
  it must be pure (no host I/O) and use `rng` for all randomness.
* `loss_fn(model, extra_state, batch, rng) -> (loss, (metrics, new_extra_state))`: a pure
  function of arrays. `model` is the module re-assembled (`nnx.merge`) from the current parameters
  inside the jitted step, so differentiating this function differentiates w.r.t. the parameters.
  `metrics` is a flat dict of scalar arrays (averaged over the global batch already).
* optional `post_update(params, extra_state, step) -> (params, extra_state)`: runs inside the same
  jitted step after the optimizer update, on pure-dict parameters (codebook renormalisation, EMA
  teacher update, re-pruning...).
* optional `prepare(extra_state, batches) -> extra_state`: host-side, runs once when training
  starts from scratch (never on resume: its result is checkpointed in `extra_state`), e.g. fitting
  k-means targets on a sample of the corpus. `batches` is an iterator of host batches.
* `encoder_path`: where the SpeechEncoder's parameters sit in the model's parameter tree, so that
  `config.init_from=<HF checkpoint dir>` can load an encoder into it.

The batch is a dict of global arrays with at least `audio` float32 [B, S] and `audio_mask` bool
[B, S]; the spine reports audio seconds from `audio_mask`.

The spine (`jaxspeech.train.trainer`) owns everything else: shardings, optax, donation, norms,
the non-finite guard, checkpoints, metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

PyTree = Any


class Method:
  """Base class; subclasses override `init` and `loss_fn` (and optionally the hooks)."""

  name: str = 'base'
  encoder_path: tuple[str, ...] = ('encoder',)

  def __init__(self, config):
    self.config = config

  def init(self, rng: jax.Array) -> tuple[nnx.Module, PyTree]:
    raise NotImplementedError(f'{type(self).__name__}.init')

  def loss_fn(self, model: nnx.Module, extra_state: PyTree, batch: dict[str, jax.Array],
              rng: jax.Array) -> tuple[jax.Array, tuple[dict[str, jax.Array], PyTree]]:
    raise NotImplementedError(f'{type(self).__name__}.loss_fn')

  def post_update(self, params: PyTree, extra_state: PyTree,
                  step: jax.Array) -> tuple[PyTree, PyTree]:
    del step
    return params, extra_state

  def prepare(self, extra_state: PyTree, batches: Iterator[dict[str, Any]]) -> PyTree:
    del batches
    return extra_state

  def extra_state_logical_axes(self, extra_state: PyTree) -> PyTree | None:
    """Logical axes for `extra_state` leaves (same structure, tuples or None); None = replicate."""
    del extra_state
    return None


def model_config(preset: str, **fields):
  """`config.model` for a SpeechEncoder: the preset name plus every `EncoderConfig` field as a
  typed placeholder (None = the preset's value), so `--config.model.num_hidden_layers=2` works
  from the command line and a misspelt field is an error naming it."""
  import dataclasses

  import ml_collections
  from ml_collections.config_dict import placeholder

  from jaxspeech.models.speech_encoder import EncoderConfig

  known = {f.name: f for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ValueError(f'config.model: unknown EncoderConfig fields {unknown}')
  c = ml_collections.ConfigDict()
  c.preset = preset
  defaults = EncoderConfig()
  for name in known:
    kind = type(getattr(defaults, name))
    c[name] = placeholder(kind)
    if name in fields:
      c[name] = tuple(fields[name]) if kind is tuple else fields[name]
  return c


def encoder_config(model_cfg):
  """`config.model` (see `model_config`) -> EncoderConfig."""
  import dataclasses

  from jaxspeech.models.speech_encoder import EncoderConfig

  known = {f.name for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(model_cfg.keys()) - known - {'preset'})
  if unknown:
    raise ValueError(f'config.model: unknown keys {unknown} (EncoderConfig fields or preset)')
  overrides = {k: v for k, v in model_cfg.items() if k != 'preset' and v is not None}
  return EncoderConfig.preset(model_cfg.preset, **overrides)


def get_method(config) -> Method:
  """Instantiates `config.method.name`: the `Method` subclass with that `name` in
  `jaxspeech/methods/<name>.py` (adding a method needs no registry edit)."""
  import importlib
  import re

  name = str(config.method.name)
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'config.method.name={name!r} is not a valid method name')
  try:
    module = importlib.import_module(f'jaxspeech.methods.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'jaxspeech.methods.{name}':
      raise
    raise ValueError(f'config.method.name={name!r}: no module jaxspeech/methods/{name}.py') from e
  found = [v for v in vars(module).values()
           if isinstance(v, type) and issubclass(v, Method) and v.name == name]
  if len(found) != 1:
    raise ValueError(f'config.method.name={name!r}: jaxspeech/methods/{name}.py must define '
                     f'exactly one Method subclass with name = {name!r} (found {len(found)})')
  return found[0](config)
