"""Config blocks every experiment shares: data, optimizer, mesh and train loop.

Each `*_config(**overrides)` returns a fresh ConfigDict with the fields below in this order;
an override must name an existing field (a misspelt one is an error here, not a new field).
Method-specific fields are added by the experiment after the call (e.g. Spin's `data.perturb`).
The defaults are HuBERT's (fairseq `hubert_base_librispeech.yaml` for the optimizer).
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Logical axis -> mesh axes (maxtext-style rules; parallelism is data). Logical names are those
# the layers put on their weights (jaxspeech/layers/partitioning.py).
DEFAULT_RULES = (
  ('embed', 'fsdp'),
  ('mlp', 'model'),
  ('heads', 'model'),
  ('kv', None),
  ('vocab', None),
  ('conv_in', None),
  ('conv_out', 'fsdp'),
  ('kernel', None),
  ('norm', None),
)


def _block(name: str, fields: dict[str, Any],
           overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise KeyError(f'{name}_config: unknown fields {unknown}; known: {list(fields)}')
  return ml_collections.ConfigDict({**fields, **overrides})


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.data`: where the audio comes from and the static batch shape."""
  return _block('data', {
    'manifest': '',  # JSONL manifest (data_pipelines.manifest); '' = the built-in corpus
    'cache_dir': '',  # where the built-in corpus is cached; '' = $JAXSPEECH_CACHE or ~/.cache
    'builtin_utterances': 400,  # size of the built-in corpus
    'split': 'train',  # manifest rows with this `split` ('' = all rows)
    'batch_size': 8,  # global, across all hosts and devices
    'num_samples': 16000,  # crop / pad length (static shapes)
    # Several static lengths instead (e.g. (32000, 64000, 128000)): each utterance is padded to
    # the shortest that holds it, cropped to the longest; one compilation per length.
    'bucket_lengths': (),
    # Per-utterance waveform scaling: 'standard' (zero mean, unit variance: the SSL encoders'
    # input), 'peak' (peak 0.95, HiFi-GAN's: synthesis), 'none'.
    'normalize': 'standard',
    'num_workers': 0,  # Grain worker processes (0 = in-process)
    'seed': 0,
  }, overrides)


def optim_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.optim`: optax AdamW, learning-rate schedule and gradient clipping."""
  return _block('optim', {
    'name': 'adamw',
    'learning_rate': 5e-4,
    'b1': 0.9,
    'b2': 0.98,
    'eps': 1e-6,
    'weight_decay': 0.01,
    'schedule': 'linear',  # constant | linear | cosine | tri_stage
    'warmup_steps': 32_000,
    'init_lr_ratio': 0.0,
    'end_lr_ratio': 0.0,
    'tri_stage_ratios': (0.1, 0.4, 0.5),
    'clip_norm': 10.0,  # 0 = no clipping
  }, overrides)


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: all devices on the data axis, `DEFAULT_RULES` for the weights."""
  c = ml_collections.ConfigDict()
  c.shape = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1})
  c.rules = DEFAULT_RULES
  return c


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.train`: loop length, logging, checkpointing and which parameters train."""
  return _block('train', {
    'num_steps': 1000,
    'log_every': 50,
    'checkpoint_every': 250,
    'keep_checkpoints': 2,
    'async_checkpointing': True,
    'seed': 0,
    'trainable': '.*',  # regex over '/'-joined parameter paths; the rest is frozen
    # Fault injection for tests of resume: SIGKILL the process right after this step's
    # checkpoint is durable (0 = off).
    'kill_after_step': 0,
    # An unreadable latest checkpoint: True = report it in one line, move it to
    # WORKDIR/corrupt_checkpoints/ and resume from the newest intact one; False = stop.
    'allow_fallback': True,
  }, overrides)
