"""Speech-encoder helpers shared by the methods: config blocks, layer features, loading.

    model_config('tiny', hidden_size=64)   # config.model: preset + typed EncoderConfig fields
    encoder_config(config.model)           # -> EncoderConfig
    layer_features(encoder, wav, mask, L)  # hidden_states[L] (final state for the last layer)
"""

from __future__ import annotations

import dataclasses

import jax

from jaxspeech.errors import ConfigError
from jaxspeech.models.speech_encoder import EncoderConfig


def model_config(preset: str, **fields):
  """`config.model` for a SpeechEncoder: the preset name plus every `EncoderConfig` field as a
  typed placeholder (None = the preset's value), so `--config.model.num_hidden_layers=2` works
  from the command line and a misspelt field is an error naming it."""
  import ml_collections
  from ml_collections.config_dict import placeholder

  known = {f.name: f for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ConfigError(f'config.model: unknown EncoderConfig fields {unknown}')
  c = ml_collections.ConfigDict()
  c.preset = preset
  defaults = EncoderConfig()
  for name in known:
    kind = type(getattr(defaults, name))
    c[name] = placeholder(kind)
    if name in fields:
      c[name] = tuple(fields[name]) if kind is tuple else fields[name]
  return c


def encoder_config(model_cfg) -> EncoderConfig:
  """`config.model` (see `model_config`) -> EncoderConfig."""
  known = {f.name for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(model_cfg.keys()) - known - {'preset'})
  if unknown:
    raise ConfigError(f'config.model: unknown keys {unknown} (EncoderConfig fields or preset)')
  overrides = {k: v for k, v in model_cfg.items() if k != 'preset' and v is not None}
  return EncoderConfig.preset(model_cfg.preset, **overrides)


def layer_features(encoder, wav: jax.Array, mask: jax.Array,
                   layer: int) -> tuple[jax.Array, jax.Array]:
  """`hidden_states[layer]` of `encoder` (HF convention: 0 = the first block's input); for the
  last layer the final hidden state (after the final LayerNorm of pre-LN models).
  `[B, S], [B, S] -> ([B, T, D], frame_mask [B, T])`."""
  final = layer == encoder.config.num_hidden_layers
  out = encoder(wav, mask, num_layers=max(layer, 1))
  return (out.last_hidden_state if final else out.hidden_states[layer]), out.frame_mask
