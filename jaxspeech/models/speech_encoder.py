"""The wav2vec 2.0 / HuBERT / WavLM / data2vec-audio speech encoder family as one Flax NNX module.

    waveform [B, S] -> ConvFeatureExtractor -> [B, T, C] -> LayerNorm -> Linear C->D
      -> (mask_time_indices: frames replaced by the learned `masked_spec_embed`)
      -> zero padded frames -> + positional conv -> (post-LN: LayerNorm)
      -> L transformer blocks (post-LN or pre-LN; WavLM: gated relative position bias;
         training with `layerdrop`: each block skipped with that probability)
      -> (pre-LN: final LayerNorm)

The positional conv is wav2vec 2.0's single weight-normed conv (`pos_conv_depth=1`) or data2vec's
stack of `pos_conv_depth` plain convs with affine-free LayerNorms (`DeepConvPositionalEmbedding`).
The families differ only by configuration (`EncoderConfig`), so one module covers them and
HF checkpoints of any of them load into it (`jaxspeech.interop.hf`). Hidden states follow HF
transformers' `output_hidden_states=True`: entry 0 is the input of the first block, entry i the
output of block i (for pre-LN models the last entry is *before* the final LayerNorm, which
`last_hidden_state` applies).

Scale knobs (config fields, all off by default, so the default encoder is the plain float32 loop):
`dtype` / `param_dtype` (compute and storage dtypes: bfloat16 compute over float32 master
weights on accelerators), `scan_layers` (the L identical blocks stored stacked on a leading
'layers' axis and run by one `jax.lax.scan`: one block to compile instead of L) and `remat`
(gradient checkpointing of each block by a `jax.checkpoint_policies` policy). `stack_layers` /
`unstack_layers` convert parameter trees between the loop and the scan layout (HF interop and
checkpoints written by either).

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
import numpy as np
from flax import nnx

from jaxspeech.layers.attention import dense, relative_position_buckets
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
  DeepConvPositionalEmbedding,
  TransformerBlock,
  dropout,
  layer_norm,
)

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
# `EncoderConfig.remat` -> policy of the per-block `jax.checkpoint` (what the backward pass keeps
# from the forward; everything else inside a block is recomputed). 'full' saves nothing but each
# block's input (= jax.checkpoint's default, 'nothing_saveable' is its jax name); 'dots_saveable'
# keeps every matmul output and recomputes only the element-wise ops;
# 'dots_with_no_batch_dims_saveable' keeps the weight matmuls and recomputes attention's batched
# [T, T] products.
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LAYER_AXIS = "layers"  # logical name of the stacked layer axis (unknown to the rules: replicated)


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
  # Kernel of the positional conv(s) (HF wav2vec2's name; HF data2vec-audio names the kernel
  # `conv_pos_kernel_size` and the depth `num_conv_pos_embeddings`: interop translates).
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  # 1: wav2vec 2.0's single weight-normed conv. > 1: data2vec's stack of that many convs, each
  # followed by a LayerNorm without affine and GELU, no weight norm (fairseq `pos_conv_depth`;
  # data2vec / DinoSR use 5 convs of kernel 19, HF `Data2VecAudioPositionalConvEmbedding`).
  pos_conv_depth: int = 1
  layer_norm_eps: float = 1e-5
  num_buckets: int = 320  # WavLM relative position buckets
  max_bucket_distance: int = 800
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  feat_proj_dropout: float = 0.0
  # LayerDrop (Fan et al. 2019), training only: each block is skipped, for the whole batch, with
  # this probability per forward pass (fairseq / HF `layerdrop`; DinoSR base.yaml: 0.05).
  layerdrop: float = 0.0
  # Scale knobs (jaxspeech only: not part of HF configs). The defaults are the exact float32 loop.
  dtype: str = "float32"  # compute/activation dtype ('bfloat16' on GPU/TPU)
  param_dtype: str = "float32"  # storage dtype of the parameters (float32 master weights)
  # Stack the L blocks on a leading 'layers' axis and run them with one jax.lax.scan: compile time
  # independent of depth. Parameter paths become encoder/layers/<name> with shape [L, ...], so
  # per-layer path regexes (frozen_mask, Spin's trainable layers) no longer select single layers;
  # WavLM's bucket embedding moves from layers/0/attention to encoder/rel_attn_embed.
  scan_layers: bool = False
  remat: str = "none"  # gradient checkpointing of each block: a key of REMAT_POLICIES

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(
        f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}"
      )
    for name in ("conv_dim", "conv_kernel", "conv_stride"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(f"EncoderConfig.{name} must be a floating dtype name, got {value!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
        f"EncoderConfig.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}"
      )
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"EncoderConfig.scan_layers must be a bool, got {self.scan_layers!r}")
    if not (isinstance(self.pos_conv_depth, int) and self.pos_conv_depth >= 1):
      raise ValueError(
        f"EncoderConfig.pos_conv_depth must be an int >= 1, got {self.pos_conv_depth!r}"
      )
    if not 0.0 <= self.layerdrop <= 1.0:
      raise ValueError(f"EncoderConfig.layerdrop must be in [0, 1], got {self.layerdrop!r}")

  @property
  def num_layers(self) -> int:
    return self.num_hidden_layers

  @property
  def has_dropout(self) -> bool:
    """Whether any dropout rate (LayerDrop included) is non-zero (a train step then needs a
    dropout key)."""
    return any(r > 0 for r in (self.hidden_dropout, self.attention_dropout,
                               self.activation_dropout, self.feat_proj_dropout, self.layerdrop))

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
  # facebook/data2vec-audio-base: wav2vec2-base with a layer-norm extractor and data2vec's 5-conv
  # positional stack (kernel 19, 16 groups); HF `Data2VecAudioConfig` defaults.
  "data2vec-audio-base": dataclasses.replace(
    _BASE,
    model_type="data2vec-audio",
    feat_extract_norm="layer",
    num_conv_pos_embeddings=19,
    pos_conv_depth=5,
  ),
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
  """Positional conv + blocks. [B, T, D] (+ frame mask [B, T]) -> hidden states.

  `cfg.scan_layers`: `layers` is one TransformerBlock whose parameters carry a leading layer axis
  [L, ...] (logical name 'layers'), run by `jax.lax.scan`; otherwise a list of L blocks run by a
  Python loop. Both layouts are initialised from the same random stream (the stacked parameters
  are the loop's, stacked: `stack_layers`), so a seed gives the same model either way.
  """

  def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    d = cfg.hidden_size
    self.cfg = cfg
    if cfg.pos_conv_depth > 1:
      self.pos_conv_embed = DeepConvPositionalEmbedding(
        d, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, cfg.pos_conv_depth,
        rngs=rngs, **kw
      )
    else:
      self.pos_conv_embed = ConvPositionalEmbedding(
        d, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, rngs=rngs, **kw
      )
    self.layer_norm = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, **kw)
    wavlm = cfg.model_type == "wavlm"

    def block(i: int, rngs: nnx.Rngs) -> TransformerBlock:
      return TransformerBlock(
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
        rngs=rngs,
        **kw,
      )

    blocks = [block(i, rngs) for i in range(cfg.num_hidden_layers)]
    # WavLM's bucket embedding (HF: layers.0.attention.rel_attn_embed) is held here when the
    # blocks are stacked, since a scanned block must be identical in every layer.
    self.rel_attn_embed = blocks[0].attention.rel_attn_embed if cfg.scan_layers and wavlm else None
    if not cfg.scan_layers:
      self.layers = nnx.List(blocks)
      return
    states = [nnx.state(b) for b in blocks]
    if wavlm:
      states[0]["attention"].pop("rel_attn_embed")
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)  # every leaf [L, ...]
    stacked = nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYER_AXIS})
    # The graph of a block without the embedding (block 1's); built abstractly, no random draws.
    template = nnx.graphdef(nnx.eval_shape(lambda: block(1, nnx.Rngs(0))))
    self.layers = nnx.merge(template, stacked)

  def position_bias(self, t: int) -> jax.Array:
    """WavLM's ungated relative position bias [N, T, T], shared by all layers."""
    if self.rel_attn_embed is None:
      return self.layers[0].attention.compute_position_bias(t)
    buckets = relative_position_buckets(t, self.cfg.num_buckets, self.cfg.max_bucket_distance)
    return jnp.transpose(self.rel_attn_embed(jnp.asarray(buckets)), (2, 0, 1))  # [N, T, T]

  def __call__(self, x, frame_mask, *, deterministic=True, rng=None, num_layers=None,
               return_ffn=False):
    """Runs the first `num_layers` blocks (all by default). Returns (hidden_states, last), and
    with `return_ffn` a third item: each block's feed-forward output before its residual add
    (`TransformerBlock`), `num_layers x [B, T, D]`. With `scan_layers` the scan runs over the
    first `num_layers` slices of the stacked parameters: an early exit, as in the loop.
    Training (`deterministic=False`) with `layerdrop` > 0 skips blocks (`layer_drops`): a skipped
    block's hidden state is its input, so the L+1 hidden states keep their static count."""
    cfg = self.cfg
    n = cfg.num_hidden_layers if num_layers is None else num_layers
    rngs = [None] * (n + 1) if rng is None else list(jax.random.split(rng, n + 1))
    drop = self.layer_drops(rng, n, deterministic)  # [n] bool or None
    x = jnp.where(frame_mask[..., None], x, 0.0)  # padded frames must not feed the pos conv
    if cfg.pos_conv_depth > 1:
      x = x + self.pos_conv_embed(x, frame_mask)
    else:
      x = x + self.pos_conv_embed(x)
    if not cfg.do_stable_layer_norm:
      x = self.layer_norm(x)
    x = dropout(x, cfg.hidden_dropout, deterministic, rngs[0])
    position_bias = self.position_bias(x.shape[1]) if cfg.model_type == "wavlm" else None
    hidden, ffn = [x], []
    if cfg.scan_layers and n > 0:
      hs, fs = self._scan(x, frame_mask, position_bias, rngs[1:], drop, n, deterministic,
                          return_ffn)
      hidden += [hs[i] for i in range(n)]  # [L, B, T, D] -> L x [B, T, D]
      ffn = [fs[i] for i in range(n)] if return_ffn else []
      x = hidden[-1]
    else:
      for i in range(n):
        if cfg.remat == "none" and drop is None:
          x = self.layers[i](x, frame_mask, position_bias, deterministic=deterministic,
                             rng=rngs[i + 1], return_ffn=return_ffn)
        else:
          graphdef, state = nnx.split(self.layers[i])
          fn = _block_fn(graphdef, cfg.remat, deterministic, return_ffn)
          if drop is None:
            x = fn(state, x, frame_mask, position_bias, rngs[i + 1])
          else:
            x = _run_or_skip(fn, drop[i], state, x, frame_mask, position_bias, rngs[i + 1])
        if return_ffn:
          x, f = x
          ffn.append(f)
        hidden.append(x)
    last = self.layer_norm(x) if cfg.do_stable_layer_norm and n == cfg.num_hidden_layers else x
    return (tuple(hidden), last, tuple(ffn)) if return_ffn else (tuple(hidden), last)

  def layer_drops(self, rng, n: int, deterministic: bool) -> jax.Array | None:
    """LayerDrop's choice for this forward pass: [n] bool, True = block i is skipped (for the
    whole batch), or None when no block can be (deterministic, or `layerdrop` 0)."""
    p = self.cfg.layerdrop
    if deterministic or p == 0.0:
      return None
    if rng is None:
      raise ValueError("layerdrop needs an rng when deterministic=False")
    # Its own stream (fold_in), so the dropout keys are those of layerdrop=0; one draw per block
    # of the whole stack, sliced, so an early exit (num_layers) skips the same blocks. Skipped
    # when u < p, as HF (`dropout_probability < layerdrop`).
    u = jax.random.uniform(jax.random.fold_in(rng, _LAYERDROP_STREAM), (self.cfg.num_layers,))
    return u[:n] < p

  def _scan(self, x, frame_mask, position_bias, keys, drop, n, deterministic, return_ffn):
    """The first n stacked blocks by `jax.lax.scan` (block i skipped where `drop[i]`). Returns
    (hidden [n, B, T, D], ffn outputs [n, B, T, D] or None)."""
    graphdef, state = nnx.split(self.layers)
    if n < self.cfg.num_hidden_layers:
      state = jax.tree.map(lambda a: a[:n], state)
    keys = None if keys[0] is None else jnp.stack(keys)  # [n] dropout keys
    fn = _block_fn(graphdef, self.cfg.remat, deterministic, return_ffn, prevent_cse=False)

    def body(h, xs):
      layer_state, key, skip = xs
      if skip is None:
        out = fn(layer_state, h, frame_mask, position_bias, key)
      else:
        out = _run_or_skip(fn, skip, layer_state, h, frame_mask, position_bias, key)
      return (out[0], out) if return_ffn else (out, (out, None))

    _, (hs, fs) = jax.lax.scan(body, x, (state, keys, drop))
    return hs, fs


_LAYERDROP_STREAM = 0x1D  # fold_in data of LayerDrop's key (any constant: a stream of its own)


def _run_or_skip(fn, skip, state, x, mask, position_bias, key):
  """`fn(state, x, mask, position_bias, key)` (a `_block_fn`), or, where the scalar bool `skip`,
  the block's input unchanged (LayerDrop; a `return_ffn` block's feed-forward output is then
  zeros). `lax.cond`: a skipped block costs no compute, as in fairseq / HF, and shapes stay
  static (under `vmap` it becomes a select of both)."""
  out_shape = jax.eval_shape(fn, state, x, mask, position_bias, key)

  def skipped(state, x, mask, position_bias, key):
    if isinstance(out_shape, tuple):  # return_ffn: (block output, feed-forward output)
      return x.astype(out_shape[0].dtype), jnp.zeros(out_shape[1].shape, out_shape[1].dtype)
    return x.astype(out_shape.dtype)

  return jax.lax.cond(skip, skipped, fn, state, x, mask, position_bias, key)


def _block_fn(graphdef, remat: str, deterministic: bool, return_ffn: bool, prevent_cse=True):
  """A block as a pure function `(state, x, mask, position_bias, key) -> block output`, wrapped
  in `jax.checkpoint` with the `remat` policy unless it is 'none'. Inside `lax.scan` CSE cannot
  merge the recomputation with the forward, so `prevent_cse=False` is safe there (and cheaper)."""

  def apply(state, x, mask, position_bias, key):
    block = nnx.merge(graphdef, state)
    return block(x, mask, position_bias, deterministic=deterministic, rng=key,
                 return_ffn=return_ffn)

  if remat == "none":
    return apply
  return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


class SpeechEncoder(nnx.Module):
  """wav2vec 2.0 / HuBERT / WavLM encoder. See the module docstring."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
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
      jax.random.uniform(rngs.params(), (config.hidden_size,)).astype(param_dtype),
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
    and dropout rates or `layerdrop` are non-zero. `num_layers` stops after that many blocks
    (feature extraction from a middle layer without running the rest).
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


def _is_layer_index(k) -> bool:
  return isinstance(k, int) or (isinstance(k, str) and k.isdigit())


def is_stacked(params: dict) -> bool:
  """Whether a SpeechEncoder parameter tree (nested dict with an 'encoder' entry) has the scan
  layout (`encoder/layers/<name>` [L, ...]) rather than the loop one (`encoder/layers/<i>/...`)."""
  return not all(_is_layer_index(k) for k in params["encoder"]["layers"])


def stack_layers(params: dict) -> dict:
  """Loop layout -> scan layout of a SpeechEncoder parameter tree (nested dict as
  `nnx.to_pure_dict` or `hf.convert_state_dict` give): `encoder/layers/<i>/<name>` [...] ->
  `encoder/layers/<name>` [L, ...], and WavLM's `encoder/layers/0/attention/rel_attn_embed` ->
  `encoder/rel_attn_embed`. numpy leaves stay numpy. Returns a new tree; `params` is unchanged."""
  if is_stacked(params):
    raise ValueError("stack_layers: the parameters are already stacked (scan layout)")
  enc = dict(params["encoder"])
  layers = enc["layers"]
  per_layer = [layers[k] for k in sorted(layers, key=int)]
  first = dict(per_layer[0])
  if "rel_attn_embed" in first["attention"]:
    first["attention"] = dict(first["attention"])
    enc["rel_attn_embed"] = first["attention"].pop("rel_attn_embed")
  per_layer[0] = first

  def stack(*a):
    return np.stack(a) if all(isinstance(v, np.ndarray) for v in a) else jnp.stack(a)

  enc["layers"] = jax.tree.map(stack, *per_layer)  # every leaf [L, ...]
  return {**params, "encoder": enc}


def unstack_layers(params: dict) -> dict:
  """Scan layout -> loop layout (the inverse of `stack_layers`): what HF checkpoints and
  per-layer path regexes expect. Returns a new tree; `params` is unchanged."""
  if not is_stacked(params):
    raise ValueError("unstack_layers: the parameters are not stacked (loop layout)")
  enc = dict(params["encoder"])
  stacked = enc.pop("layers")
  embed = enc.pop("rel_attn_embed", None)
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  layers = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)}
  if embed is not None:
    layers[0] = {**layers[0], "attention": {**layers[0]["attention"], "rel_attn_embed": embed}}
  enc["layers"] = layers
  return {**params, "encoder": enc}


def to_layer_layout(params: dict, scan_layers: bool) -> dict:
  """`params` in the layout of an encoder with `scan_layers` (converted only when needed): e.g.
  an HF checkpoint or a loop-model workdir loaded into a scan model, or the reverse."""
  if is_stacked(params) == scan_layers:
    return params
  return stack_layers(params) if scan_layers else unstack_layers(params)
