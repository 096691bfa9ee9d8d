"""The wav2vec 2.0 / HuBERT / WavLM speech encoder family as one Flax NNX module.

    waveform [B, S] -> ConvFeatureExtractor -> [B, T, C] -> LayerNorm -> Linear C->D
      -> (mask_time_indices: frames replaced by the learned `masked_spec_embed`)
      -> zero padded frames -> + ConvPositionalEmbedding -> (post-LN: LayerNorm)
      -> L transformer blocks (post-LN or pre-LN; WavLM: gated relative position bias)
      -> (pre-LN: final LayerNorm)

The three families differ only by configuration (`EncoderConfig`), so one module covers them and
HF checkpoints of any of them load into it (`jaxspeech.interop.hf`). Hidden states follow HF
transformers' `output_hidden_states=True`: entry 0 is the input of the first block, entry i the
output of block i (for pre-LN models the last entry is *before* the final LayerNorm, which
`last_hidden_state` applies).

Padding: `wav_mask` marks real samples; frames are valid when their whole receptive field is, the
first GroupNorm uses valid frames only, padded frames are zeroed before the positional conv and
masked out of attention keys — batched utterances give the features of one at a time.

Legend: B batch, S samples, T frames (50 Hz), C conv channels, D width, L layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.layers.attention import dense
from jaxspeech.layers.conv_feature_extractor import ConvFeatureExtractor, conv_output_lengths
from jaxspeech.layers.partitioning import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_LENGTH,
    CONV_OUT,
    EMBED,
    constrain,
)
from jaxspeech.layers.transformer import (
  ConvPositionalEmbedding,
  TransformerBlock,
  dropout,
  layer_norm,
)

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a speech encoder. Field names follow HF transformers' configs."""

  model_type: str = "hubert"
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"  # 'group' (base) or 'layer' (large)
  feat_proj_layer_norm: bool = True  # HuBERT may omit the LayerNorm before the projection
  do_stable_layer_norm: bool = False  # pre-LN transformer (large models)
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  layer_norm_eps: float = 1e-5
  num_buckets: int = 320  # WavLM relative position buckets
  max_bucket_distance: int = 800
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  feat_proj_dropout: float = 0.0
  dtype: str = "float32"  # activation dtype ('bfloat16' on accelerators); params stay float32

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(
        f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}"
      )
    for name in ("conv_dim", "conv_kernel", "conv_stride"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

  @property
  def num_layers(self) -> int:
    return self.num_hidden_layers

  @property
  def has_dropout(self) -> bool:
    """Whether any dropout rate is non-zero (a train step then needs a dropout key)."""
    return any(r > 0 for r in (self.hidden_dropout, self.attention_dropout,
                               self.activation_dropout, self.feat_proj_dropout))

  def num_frames(self, num_samples: int) -> int:
    """Static number of frames T for S samples."""
    return conv_output_lengths(int(num_samples), self.conv_kernel, self.conv_stride)[-1]

  def frame_lengths(self, sample_lengths: jax.Array) -> jax.Array:
    return conv_output_lengths(sample_lengths, self.conv_kernel, self.conv_stride)[-1]

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> EncoderConfig:
    if name not in PRESETS:
      raise ValueError(f"unknown encoder preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> EncoderConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown EncoderConfig keys: {unknown}")
    return cls(**d)


_BASE = EncoderConfig()
_LARGE = dataclasses.replace(
  _BASE,
  hidden_size=1024,
  num_hidden_layers=24,
  num_attention_heads=16,
  intermediate_size=4096,
  feat_extract_norm="layer",
  do_stable_layer_norm=True,
  conv_bias=True,
)
PRESETS: dict[str, EncoderConfig] = {
  "wav2vec2-base": dataclasses.replace(_BASE, model_type="wav2vec2"),
  # facebook/wav2vec2-large (LS-960): post-LN, group norm; -lv60 is the pre-LN variant.
  "wav2vec2-large": dataclasses.replace(
    _LARGE,
    model_type="wav2vec2",
    feat_extract_norm="group",
    do_stable_layer_norm=False,
    conv_bias=False,
  ),
  "wav2vec2-large-lv60": dataclasses.replace(_LARGE, model_type="wav2vec2"),
  "hubert-base": _BASE,
  "hubert-large": dataclasses.replace(_LARGE, model_type="hubert"),
  "wavlm-base": dataclasses.replace(_BASE, model_type="wavlm"),
  "wavlm-large": dataclasses.replace(_LARGE, model_type="wavlm"),
  # A CPU-sized encoder with the base architecture's shape, for tests and the tiny recipes.
  "tiny": dataclasses.replace(
    _BASE,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    conv_dim=(128,) * 7,
    num_conv_pos_embeddings=32,
    num_conv_pos_embedding_groups=8,
  ),
}


class EncoderOutput(NamedTuple):
  hidden_states: tuple[jax.Array, ...]  # L+1 x [B, T, D], HF conventions (module docstring)
  last_hidden_state: jax.Array  # [B, T, D] (pre-LN models: after the final LayerNorm)
  frame_mask: jax.Array  # [B, T] bool, True = valid frame
  features: jax.Array  # [B, T, C] conv features after the projection's LayerNorm


class FeatureProjection(nnx.Module):
  def __init__(self, c: int, d: int, *, use_norm: bool, eps: float, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm = layer_norm(c, eps, **kw) if use_norm else None
    self.projection = dense(c, d, (CONV_OUT, EMBED), **kw)

  def __call__(self, x):
    normed = self.layer_norm(x) if self.layer_norm is not None else x
    return self.projection(normed), normed


class TransformerEncoder(nnx.Module):
  """Positional conv + blocks. [B, T, D] (+ frame mask [B, T]) -> hidden states."""

  def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.hidden_size
    self.cfg = cfg
    self.pos_conv_embed = ConvPositionalEmbedding(
      d, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, **kw
    )
    self.layer_norm = layer_norm(d, cfg.layer_norm_eps, **kw)
    wavlm = cfg.model_type == "wavlm"
    self.layers = nnx.List(
      [
        TransformerBlock(
          d,
          cfg.num_attention_heads,
          cfg.intermediate_size,
          pre_norm=cfg.do_stable_layer_norm,
          act=cfg.hidden_act,
          eps=cfg.layer_norm_eps,
          hidden_dropout=cfg.hidden_dropout,
          attention_dropout=cfg.attention_dropout,
          activation_dropout=cfg.activation_dropout,
          gated_rel_pos=wavlm,
          has_rel_embed=wavlm and i == 0,
          num_buckets=cfg.num_buckets,
          max_distance=cfg.max_bucket_distance,
          **kw,
        )
        for i in range(cfg.num_hidden_layers)
      ]
    )

  def __call__(self, x, frame_mask, *, deterministic=True, rng=None, num_layers=None,
               return_ffn=False):
    """Runs the first `num_layers` blocks (all by default). Returns (hidden_states, last), and
    with `return_ffn` a third item: each block's feed-forward output before its residual add
    (`TransformerBlock`), `num_layers x [B, T, D]`."""
    cfg = self.cfg
    n = cfg.num_hidden_layers if num_layers is None else num_layers
    rngs = [None] * (n + 1) if rng is None else list(jax.random.split(rng, n + 1))
    x = jnp.where(frame_mask[..., None], x, 0.0)  # padded frames must not feed the pos conv
    x = x + self.pos_conv_embed(x)
    if not cfg.do_stable_layer_norm:
      x = self.layer_norm(x)
    x = dropout(x, cfg.hidden_dropout, deterministic, rngs[0])
    position_bias = None
    if cfg.model_type == "wavlm":
      position_bias = self.layers[0].attention.compute_position_bias(x.shape[1])  # [N, T, T]
    hidden, ffn = [x], []
    for i in range(n):
      x = self.layers[i](x, frame_mask, position_bias, deterministic=deterministic, rng=rngs[i + 1],
                         return_ffn=return_ffn)
      if return_ffn:
        x, f = x
        ffn.append(f)
      hidden.append(x)
    last = self.layer_norm(x) if cfg.do_stable_layer_norm and n == cfg.num_hidden_layers else x
    return (tuple(hidden), last, tuple(ffn)) if return_ffn else (tuple(hidden), last)


class SpeechEncoder(nnx.Module):
  """wav2vec 2.0 / HuBERT / WavLM encoder. See the module docstring."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.feature_extractor = ConvFeatureExtractor(
      config.conv_dim,
      config.conv_kernel,
      config.conv_stride,
      conv_bias=config.conv_bias,
      norm=config.feat_extract_norm,
      **kw,
    )
    self.feature_projection = FeatureProjection(
      config.conv_dim[-1],
      config.hidden_size,
      use_norm=config.feat_proj_layer_norm,
      eps=config.layer_norm_eps,
      **kw,
    )
    self.masked_spec_embed = nnx.Param(
      jax.random.uniform(rngs.params(), (config.hidden_size,)),
      out_sharding=(EMBED,),
      eager_sharding=False,
    )
    self.encoder = TransformerEncoder(config, **kw)

  def embed(
    self,
    wav: jax.Array,
    wav_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rng: jax.Array | None = None,
  ):
    """Conv features and their projection. Returns (projected [B,T,D], features [B,T,C], mask)."""
    # Pin the batch split at entry: callers may build the batch in the step (e.g. Spin's two
    # views concatenated), and the conv extractor must not run on the whole batch per device.
    wav = constrain(wav, ACT_BATCH, None)  # [B, S]
    if wav_mask is not None:
      wav_mask = constrain(wav_mask, ACT_BATCH, None)
    lengths = None if wav_mask is None else jnp.sum(wav_mask, axis=-1)
    feats, frame_mask = self.feature_extractor(wav, lengths)  # [B, T, C], [B, T]
    feats = constrain(feats, ACT_BATCH, ACT_LENGTH, None)
    x, normed = self.feature_projection(feats)  # [B, T, D], [B, T, C]
    x = constrain(x, ACT_BATCH, ACT_LENGTH, ACT_EMBED)
    x = dropout(x, self.config.feat_proj_dropout, deterministic, rng)
    return x, normed, frame_mask

  def __call__(
    self,
    wav: jax.Array,
    wav_mask: jax.Array | None = None,
    mask_time_indices: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: jax.Array | nnx.Rngs | None = None,
    num_layers: int | None = None,
  ) -> EncoderOutput:
    """wav [B, S] float; wav_mask [B, S] bool (True = real sample); mask_time_indices [B, T] bool.

    `rngs` (a key or nnx.Rngs with a 'dropout' stream) is needed only when deterministic=False
    and dropout rates are non-zero. `num_layers` stops after that many blocks (feature
    extraction from a middle layer without running the rest).
    """
    rng = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
    r_embed, r_enc = (None, None) if rng is None else jax.random.split(rng)
    x, feats, frame_mask = self.embed(wav, wav_mask, deterministic=deterministic, rng=r_embed)
    if mask_time_indices is not None:
      x = jnp.where(mask_time_indices[..., None], self.masked_spec_embed[...].astype(x.dtype), x)
    hidden, last = self.encoder(
      x, frame_mask, deterministic=deterministic, rng=r_enc, num_layers=num_layers
    )
    return EncoderOutput(hidden, last, frame_mask, feats)


def frozen_mask(params: Any, trainable: Sequence[str] | str | None) -> Any:
  """Pytree of bools: True where a parameter's '/'-joined path matches one of the `trainable`
  regexes (None = everything trainable). Layer freezing is configuration, not code surgery:
  e.g. Spin's `trainable=r"^encoder/layers/(10|11)/"`."""
  import re

  if trainable is None:
    return jax.tree.map(lambda _: True, params)
  pats = [re.compile(p) for p in ([trainable] if isinstance(trainable, str) else trainable)]

  def match(path, _):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return any(p.search(name) for p in pats)

  return jax.tree_util.tree_map_with_path(match, params)
