"""The Method contract (version 2): what a training method gives the one shared train step.

A method is a small class built from the experiment config. The spine
(`jaxspeech.train.trainer` + `jaxspeech.train.step`) owns everything else: shardings, optax,
donation, norms, the non-finite guard, checkpoints, metrics, evaluation during training.

Model and state
* `init(rng) -> (model, extra_state)`: the NNX module (its `nnx.Param`s are what the optimizers
  update) and a pytree of non-trainable state the loss needs and may update (EMA teachers,
  codebooks, k-means targets, pruning masks...). Called under `jax.eval_shape` / `jax.jit`: pure,
  all randomness from `rng`. Any model: an encoder, a GAN's generator + discriminator, an image
  classifier -- the step never looks inside.
* `param_groups(params) -> {group: bool tree}`: named, disjoint groups of parameters, each with
  its own optimizer (`config.optim.<group>`, or one flat `config.optim` used by every group), its
  own loss and its own update schedule. Default: one group `all` holding every parameter.
  `config.train.trainable` (a regex) and `config.optim.<group>.frozen` freeze parts of a group.
* `loss_fn(model, extra_state, batch, rng) -> (loss, (metrics, new_extra_state))`: a pure
  function of arrays. `loss` is a scalar (one group) or `{group: scalar}`: group g's parameters
  get the gradient of `loss[g]` only (a GAN's discriminator loss moves only the discriminator).
  `model` is re-assembled (`nnx.merge`) from the current parameters inside the jitted step.
  `metrics` is a flat dict of scalar arrays (averages over the global batch).
* `updates_at(step, groups) -> {group: bool}`: whether each group is updated at this (traced)
  step (a Python True = always, statically). Default: group g updates when
  `step % every == phase` (`config.optim.<group>.every`, `.phase`; default every step) -- e.g.
  D on even steps and G on odd ones. Skipped groups keep their parameters and optimizer state
  bit for bit.
* `post_update(params, extra_state, step) -> (params, extra_state)`: inside the same jitted step
  after the updates (codebook renormalisation, EMA teachers, re-pruning...).
* `extra_state_logical_axes(extra_state)`: logical axes of the extra state (None = replicate).

Data
* `batch_spec(config, num_samples=None) -> {field: ShapeDtypeStruct}`: the global batch the step
  takes, for one bucket length. The data path checks every batch against it (a missing field, a
  wrong shape or dtype is an error naming the field) and keeps only its fields; the AOT compile
  lowers the step on it. Default: the audio pipeline's fields (`audio`, `audio_mask` [B, S], ...)
  when `uses_audio`, else the bookkeeping fields, plus `row_fields()` with a batch dimension.
* `row_fields() -> {field: ShapeDtypeStruct}` (per row, no batch dim) and
  `host_fields(row) -> {field: np.ndarray}`: a map, run in the Grain workers, from one manifest
  row (JSON: audio, text, phones, images, labels, pairs) to fixed-shape arrays. Filler rows get
  zeros. `uses_audio = False` methods read rows only (no audio decoding at all).
* `default_manifest(data_config) -> path`: the manifest used when `config.data.manifest` is ''
  (default: the built-in synthetic speech corpus).
* `fit_host_state(rows) -> dict` / `set_host_state(d)`: derived host-side state that shapes the
  model or the batches (vocabularies, phone inventories, label lengths). Fitted once on the
  training manifest's rows when a run starts from scratch, written to `WORKDIR/host_state.json`,
  and from then on only read back (resume, extraction, evaluation): never recomputed from a
  manifest. JSON-able. Default: {}.
* `prepare(extra_state, batches) -> extra_state`: host-side set-up on the data (e.g. k-means
  targets) when a run starts from scratch; its result is checkpointed in the extra state.

Loading and prediction
* `load_pretrained(params, src) -> params`: `config.init_from=src` (an HF checkpoint folder or
  another method's workdir). Default: merge a speech encoder into `encoder_path`.
* `predict_fns(model, extra_state) -> {kind: fn}`: what `extract`, `evaluate` and the evaluators
  call, never `hasattr` or method names. Kinds and signatures (arrays in, arrays out, jit-able):
    'features' (wav [B, S], mask [B, S], layer: int) -> ([B, T, D] float32, frame_mask [B, T])
    'units'    (wav [B, S], mask [B, S], layer: int | None = None) -> ([B, T] int32, frame_mask)
    'logits'   (wav [B, S], mask [B, S]) -> ([B, T, V] float32, frame_mask [B, T])  (CTC)
    'labels'   (batch: dict of the batch spec's fields) -> [B] int32  (classifiers)
    'phone_posteriors' (wav [B, S], mask [B, S]) -> ([B, F, V] log-probs, frame_mask [B, F])
               (frame phone classifiers: `jaxspeech.methods.phone_judge`)
    'synthesize'  (phones [B, P], speaker [B], num_frames: int, duration_scale=1.0) ->
               (log-mel [B, T, M], frame_mask [B, T], durations [B, P])  (TTS acoustic models)
    'vocode'   (log-mel [B, T, M]) -> [B, T * hop] float32  (vocoders)
    'samples'  (rng, n: int) -> [n, ...] float32  (generators)
    'pair_embeddings'  (batch, modality: 'audio' | 'visual') -> {'summary' [B, E],
               'code_dist' [B, V], 'codes' [B, T] int32, 'mask' [B, T]}  (cross-modal retrieval)
    'pair_similarity'  (audio: dict, visual: dict, part: str = 'combined') -> [Na, Nv] float32,
               from two 'pair_embeddings' outputs (`jaxspeech.methods.cmcm`)
  and `encoder(model)` gives the SpeechEncoder of a model that has one (None otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.errors import ConfigError

# Encoder helpers live in jaxspeech.models; re-exported for the experiment files.
from jaxspeech.models.encoders import encoder_config, layer_features, model_config  # noqa: F401
from jaxspeech.models.params import merge_subtree, subtree

PyTree = Any
ALL = 'all'
# Fields every batch of the data path carries (data_pipelines.pipeline), [B] each.
BOOKKEEPING = {'index': jnp.int32, 'valid': jnp.bool_}
AUDIO_BOOKKEEPING = {'index': jnp.int32, 'valid': jnp.bool_, 'offset': jnp.int32,
                     'speaker_id': jnp.int32}


class Method:
  """Base class; subclasses override `init` and `loss_fn` (and optionally the hooks)."""

  name: str = 'base'
  encoder_path: tuple[str, ...] | None = ('encoder',)
  uses_audio: bool = True

  def __init__(self, config):
    self.config = config

  # --- model and state -------------------------------------------------------------------------

  def init(self, rng: jax.Array) -> tuple[nnx.Module, PyTree]:
    raise NotImplementedError(f'{type(self).__name__}.init')

  def param_groups(self, params: PyTree) -> dict[str, PyTree]:
    return {ALL: jax.tree.map(lambda _: True, params)}

  def loss_fn(self, model: nnx.Module, extra_state: PyTree, batch: dict[str, jax.Array],
              rng: jax.Array) -> tuple[jax.Array | dict[str, jax.Array],
                                       tuple[dict[str, jax.Array], PyTree]]:
    raise NotImplementedError(f'{type(self).__name__}.loss_fn')

  def updates_at(self, step: jax.Array, groups: tuple[str, ...]) -> dict[str, jax.Array]:
    out = {}
    for g in groups:
      every, phase = group_schedule(self.config.optim, g)
      out[g] = True if every == 1 else (step % every) == phase
    return out

  def post_update(self, params: PyTree, extra_state: PyTree,
                  step: jax.Array) -> tuple[PyTree, PyTree]:
    del step
    return params, extra_state

  def extra_state_logical_axes(self, extra_state: PyTree) -> PyTree | None:
    """Logical axes for `extra_state` leaves (same structure, tuples or None); None = replicate."""
    del extra_state
    return None

  # --- data ------------------------------------------------------------------------------------

  def row_fields(self) -> dict[str, jax.ShapeDtypeStruct]:
    return {}

  def host_fields(self, row: dict) -> dict[str, np.ndarray]:
    del row
    return {}

  def batch_spec(self, config, num_samples: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    b = int(config.data.batch_size)
    spec = {}
    if self.uses_audio:
      s = int(num_samples if num_samples is not None else max(bucket_lengths(config.data)))
      spec['audio'] = jax.ShapeDtypeStruct((b, s), jnp.float32)
      spec['audio_mask'] = jax.ShapeDtypeStruct((b, s), jnp.bool_)
      if str(config.data.get('perturb', '') or ''):
        spec['audio_perturbed'] = jax.ShapeDtypeStruct((b, s), jnp.float32)
      book = AUDIO_BOOKKEEPING
    else:
      book = BOOKKEEPING
    spec.update({k: jax.ShapeDtypeStruct((b,), t) for k, t in book.items()})
    for k, v in self.row_fields().items():
      if k in spec:
        raise ValueError(f'{type(self).__name__}.row_fields: {k!r} is a field of the pipeline')
      spec[k] = jax.ShapeDtypeStruct((b, *v.shape), v.dtype)
    return spec

  def training_rows(self) -> list[dict]:
    """Rows of `config.data.manifest` (or `default_manifest`) of split `config.data.split`."""
    import os

    from data_pipelines.manifest import read_manifest

    d = self.config.data
    path = str(d.manifest)
    if path:
      if not os.path.exists(path):
        raise FileNotFoundError(f'config.data.manifest={path!r}: no such file')
    else:
      path = self.default_manifest(d)
    rows = read_manifest(path) if self.uses_audio else read_manifest(path, required=())
    split = str(d.split)
    if split and any('split' in r for r in rows):
      rows = [r for r in rows if r.get('split') == split]
      if not rows:
        raise ConfigError(f'config.data.split={split!r}: no row of {path} has this split')
    return rows

  def default_manifest(self, data_config) -> str:
    from data_pipelines.synth import built_in_corpus

    return built_in_corpus(str(data_config.cache_dir) or None,
                           num_utterances=int(data_config.builtin_utterances))

  def fit_host_state(self, rows: list[dict]) -> dict:
    del rows
    return {}

  def set_host_state(self, host_state: dict) -> None:
    if host_state:
      raise ValueError(f'{type(self).__name__} keeps no host state, got keys {sorted(host_state)}')

  def prepare(self, extra_state: PyTree, batches: Iterator[dict[str, Any]]) -> PyTree:
    del batches
    return extra_state

  # --- loading and prediction -----------------------------------------------------------------

  def load_pretrained(self, params: PyTree, source: Pretrained) -> PyTree:
    """`config.init_from`: a source other than a workdir of this very method (whose parameters
    are restored whole by the trainer). Default: its speech encoder merged into `encoder_path`;
    parameters the source lacks and HF checkpoints may omit (`masked_spec_embed`) keep their
    initial values."""
    if self.encoder_path is None:
      raise ConfigError(f'config.init_from={source.path!r}: the {self.name} model has no speech '
                        f'encoder to load into (override {type(self).__name__}.load_pretrained)')
    prefix = tuple(self.encoder_path)
    enc = dict(source.encoder_params())
    node = subtree(params, prefix, f'config.init_from={source.path!r}')
    for k in ('masked_spec_embed',):
      if k in node and k not in enc:
        enc[k] = np.asarray(node[k])
    # A per-layer source into a `scan_layers` model (or back): stack / unstack the blocks.
    from jaxspeech.models.speech_encoder import is_stacked, to_layer_layout

    enc = to_layer_layout(enc, is_stacked(node))
    return merge_subtree(params, prefix, enc, f'config.init_from={source.path!r} ({source.kind})')

  def encoder(self, model: nnx.Module):
    """The SpeechEncoder inside `model` (None when the model has none)."""
    if self.encoder_path is None:
      return None
    for key in self.encoder_path:
      model = getattr(model, key)
    return model

  def predict_fns(self, model: nnx.Module, extra_state: PyTree) -> dict[str, Callable]:
    del extra_state
    enc = self.encoder(model)
    if enc is None:
      return {}
    return {'features': lambda wav, mask, layer: layer_features(enc, wav, mask, layer)}


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A `config.init_from` source, resolved by the trainer: `kind` is 'hf' (an HF checkpoint
  folder) or 'workdir' (a jaxspeech workdir of method `method_name`); `encoder_params()` loads
  its speech encoder's parameters (pure dict of numpy arrays) on demand."""

  path: str
  kind: str
  method_name: str | None
  encoder_params: Callable[[], PyTree]


def group_optim_config(optim_config, group: str):
  """The optimizer block of `group`: `config.optim.<group>`, or the flat `config.optim` (a block
  with a `name`) shared by every group."""
  if 'name' in optim_config:
    return optim_config
  if group not in optim_config:
    raise ConfigError(f'config.optim.{group}: missing (parameter group {group!r}; config.optim has '
                      f'{sorted(optim_config.keys())})')
  return optim_config[group]


def group_schedule(optim_config, group: str) -> tuple[int, int]:
  """(every, phase): group updates at steps with `step % every == phase`."""
  c = group_optim_config(optim_config, group)
  every, phase = int(c.get('every', 1) or 1), int(c.get('phase', 0) or 0)
  if every < 1 or not 0 <= phase < every:
    raise ConfigError(f'config.optim.{group}: every={every}, phase={phase} (need every >= 1 and '
                      '0 <= phase < every)')
  return every, phase


def bucket_lengths(data_config) -> tuple[int, ...]:
  """`config.data.bucket_lengths` (several static crop/pad lengths) or (`num_samples`,)."""
  buckets = tuple(int(b) for b in (data_config.get('bucket_lengths', ()) or ()))
  return buckets or (int(data_config.num_samples),)


def get_method(config) -> Method:
  """Instantiates `config.method.name`: the `Method` subclass with that `name` in
  `jaxspeech/methods/<name>.py` (adding a method needs no registry edit)."""
  import importlib
  import re

  name = str(config.method.name)
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ConfigError(f'config.method.name={name!r} is not a valid method name')
  try:
    module = importlib.import_module(f'jaxspeech.methods.{name}')
  except ModuleNotFoundError as e:
    if e.name != f'jaxspeech.methods.{name}':
      raise
    raise ConfigError(f'config.method.name={name!r}: no module jaxspeech/methods/{name}.py') from e
  found = [v for v in vars(module).values()
           if isinstance(v, type) and issubclass(v, Method) and v.name == name]
  if len(found) != 1:
    raise ConfigError(f'config.method.name={name!r}: jaxspeech/methods/{name}.py must define '
                      f'exactly one Method subclass with name = {name!r} (found {len(found)})')
  return found[0](config)
