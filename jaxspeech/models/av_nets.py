"""Audio-visual classifiers of UAVM (Gong et al., IEEE SPL 2022; reference `YuanGongND/uavm`,
`src/models/mm_trans.py`) and its two baselines, built from one block: `Stage`.

  Stage        LayerNorm(input) -> Linear -> + learned positions -> pre-LN transformer blocks
               (ViT blocks, GELU); the reference's `SingleTrans`. Optional frame stacking first
               (s consecutive frames -> one frame of s x C features: a static, exact downsampling).
               The upper stage of 'shared' / 'separate' adds no positions of its own: the
               modality stages did, and with unequal lengths (e.g. 25 audio vs 8 video tokens)
               the mean of a second position table over a clip would mark its modality (the
               reference's inputs are both 30 steps, where it cannot).
  sharing='shared'    UAVM (`UnifiedTrans`): a modality-specific Stage per modality -> ONE upper
                      Stage (the same weights for audio and for video) -> masked mean over time ->
                      ONE head (LayerNorm -> Linear). Each input is one modality.
  sharing='separate'  the modality-independent baseline (`SeperateTrans`): the same sizes, but the
                      upper Stage and the head are per modality (no weight is shared).
  sharing='fusion'    the cross-modal attention baseline (`FullAttTrans`): the two modality
                      stages' tokens are concatenated and ONE upper Stage attends over all of
                      them (every audio frame attends to every video frame and back) -> masked
                      mean over the valid tokens of both -> head. A missing modality is given as
                      an all-False mask (its tokens are neither attended to nor pooled).

Audio-visual prediction (`av_logits`): the mean of the audio-only and the video-only logits for
'shared' / 'separate' (the paper's AV inference), the fused logits for 'fusion'.
`layers(...)` gives every layer's hidden states for the modality probe: layer 0 = the
modality-specific stage's input embedding, 1..depth_i its blocks, depth_i+1..depth_i+depth_s
the upper stage's blocks (width `upper_dim`, the reference's `s_embed_dim`).

Legend: B batch, T frames (Ta audio, Tv video, after frame stacking), C input features,
D width (U of the upper stage), K classes, L = depth_i + depth_s layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.layers.attention import DENSE_INIT, dense
from jaxspeech.layers.partitioning import EMBED, VOCAB
from jaxspeech.layers.transformer import TransformerBlock, layer_norm

SHARING = ('shared', 'separate', 'fusion')
MODALITIES = ('audio', 'visual')
EPS = 1e-6  # LayerNorm epsilon of the reference (nn.LayerNorm(..., eps=1e-06))


@dataclasses.dataclass(frozen=True)
class AVConfig:
  """Sizes of an `AVClassifier` (the reference's defaults in `egs/vggsound/run_uavm.sh`:
  dim 1024, 4 heads, depth_i 3, depth_s 3, 30-step inputs of 1024 features)."""

  audio_dim: int  # C of an audio frame (e.g. 39 MFCC + deltas)
  visual_dim: int  # C of a video frame (e.g. 8 pixels of an image row)
  audio_frames: int  # Ta before stacking (static, padded)
  visual_frames: int  # Tv (static, padded)
  num_classes: int
  dim: int = 64
  num_heads: int = 4
  depth_i: int = 1  # modality-specific blocks
  depth_s: int = 2  # upper (shared / separate / fusion) blocks
  mlp_ratio: int = 4
  # Width of the upper stage (the reference's `s_embed_dim`; 0 = `dim`). Its input LayerNorm +
  # Linear project dim -> upper_dim. A narrow shared stage is what makes UAVM's shared layers
  # modality-agnostic in the reference's probe (egs/vggsound: s_embed_dim 16 / 32 vs 1024).
  upper_dim: int = 0
  audio_stack: int = 1  # audio frames stacked into one (downsampling by this factor)
  dropout: float = 0.0
  sharing: str = 'shared'

  def __post_init__(self):
    if self.sharing not in SHARING:
      raise ValueError(f'sharing={self.sharing!r}: one of {SHARING}')
    if self.audio_frames % self.audio_stack:
      raise ValueError(f'audio_frames={self.audio_frames} is not a multiple of audio_stack='
                       f'{self.audio_stack}')
    for name, d in (('dim', self.dim), ('upper_dim', self.upper_width)):
      if d % self.num_heads:
        raise ValueError(f'{name}={d} is not divisible by num_heads={self.num_heads}')
    if self.depth_s < 1:
      raise ValueError(f'depth_s={self.depth_s}: the upper stage needs >= 1 block')

  @property
  def audio_tokens(self) -> int:
    return self.audio_frames // self.audio_stack

  @property
  def upper_width(self) -> int:
    return self.upper_dim or self.dim

  @property
  def num_layers(self) -> int:
    return self.depth_i + self.depth_s


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the valid frames. `[B, T, D]`, `[B, T]` -> `[B, D]` (0 for a row with none)."""
  w = mask.astype(x.dtype)[..., None]  # [B, T, 1]
  return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def stack_frames(x: jax.Array, mask: jax.Array, s: int) -> tuple[jax.Array, jax.Array]:
  """s consecutive frames -> one: `[B, T, C]`, `[B, T]` -> `[B, T/s, s*C]`, `[B, T/s]` (a stacked
  frame is valid when any of its frames is; its padded frames are zeros, whatever they held)."""
  if s == 1:
    return x, mask
  b, t, c = x.shape
  x = jnp.where(mask[..., None], x, 0.0)
  return x.reshape(b, t // s, s * c), mask.reshape(b, t // s, s).any(-1)


class Stage(nnx.Module):
  """LayerNorm -> Linear -> + positions -> `depth` pre-LN blocks. `[B, T, C] -> L+1 x [B, T, D]`.
  `seq_len` is the longest input (positions [0, T) are used)."""

  def __init__(self, input_dim: int, dim: int, seq_len: int, depth: int, num_heads: int,
               mlp_ratio: int, dropout: float = 0.0, positions: bool = True, *,
               rngs: nnx.Rngs):
    kw = dict(dtype=None, param_dtype=jnp.float32, rngs=rngs)
    self.in_norm = layer_norm(input_dim, EPS, **kw)
    self.in_proj = dense(input_dim, dim, (None, EMBED), **kw)
    self.pos_embed = nnx.Param(DENSE_INIT(rngs.params(), (seq_len, dim), jnp.float32),
                               out_sharding=(None, EMBED), eager_sharding=False) if positions \
      else None  # [T, D]
    self.blocks = nnx.List([
      TransformerBlock(dim, num_heads, mlp_ratio * dim, pre_norm=True, act='gelu', eps=EPS,
                       hidden_dropout=dropout, attention_dropout=dropout, **kw)
      for _ in range(depth)])

  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> list[jax.Array]:
    t = x.shape[1]
    h = self.in_proj(self.in_norm(x))  # [B, T, D]
    if self.pos_embed is not None:
      h = h + self.pos_embed[...][:t]
    out = [h]
    keys = [None] * len(self.blocks) if rng is None else list(jax.random.split(rng,
                                                                               len(self.blocks)))
    for block, key in zip(self.blocks, keys):
      h = block(h, mask, deterministic=deterministic, rng=key)
      out.append(h)
    return out


class Head(nnx.Module):
  """LayerNorm -> Linear: pooled `[B, D] -> [B, K]` (the reference's `mlp_head`)."""

  def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
    kw = dict(dtype=None, param_dtype=jnp.float32, rngs=rngs)
    self.norm = layer_norm(dim, EPS, **kw)
    self.proj = dense(dim, num_classes, (EMBED, VOCAB), **kw)

  def __call__(self, pooled: jax.Array) -> jax.Array:
    return self.proj(self.norm(pooled))


class AVClassifier(nnx.Module):
  """UAVM ('shared') and its baselines ('separate', 'fusion'); see the module docstring."""

  def __init__(self, config: AVConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    stage = dict(num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout, rngs=rngs)
    self.audio_stage = Stage(c.audio_dim * c.audio_stack, c.dim, c.audio_tokens, c.depth_i,
                             **stage)
    self.visual_stage = Stage(c.visual_dim, c.dim, c.visual_frames, c.depth_i, **stage)
    u = c.upper_width
    if c.sharing == 'shared':
      self.upper = Stage(c.dim, u, max(c.audio_tokens, c.visual_frames), c.depth_s,
                         positions=False, **stage)
      self.head = Head(u, c.num_classes, rngs=rngs)
    elif c.sharing == 'separate':
      self.audio_upper = Stage(c.dim, u, c.audio_tokens, c.depth_s, positions=False, **stage)
      self.visual_upper = Stage(c.dim, u, c.visual_frames, c.depth_s, positions=False, **stage)
      self.audio_head = Head(u, c.num_classes, rngs=rngs)
      self.visual_head = Head(u, c.num_classes, rngs=rngs)
    else:  # fusion: one upper stage over the concatenated tokens
      self.upper = Stage(c.dim, u, c.audio_tokens + c.visual_frames, c.depth_s, **stage)
      self.head = Head(u, c.num_classes, rngs=rngs)

  # --- per modality ------------------------------------------------------------------------------

  def _lower(self, x, mask, modality, deterministic, rng):
    if modality == 'audio':
      x, mask = stack_frames(x, mask, self.config.audio_stack)
      return self.audio_stage(x, mask, deterministic=deterministic, rng=rng), mask
    if modality == 'visual':
      return self.visual_stage(x, mask, deterministic=deterministic, rng=rng), mask
    raise ValueError(f'modality {modality!r}: one of {MODALITIES}')

  def layers(self, x: jax.Array, mask: jax.Array, modality: str, *, deterministic: bool = True,
             rng: jax.Array | None = None) -> tuple[list[jax.Array], jax.Array]:
    """Hidden states of one modality: (L+1 x `[B, T, D]`, frame mask `[B, T]`). For 'fusion'
    the other modality is absent (all-False mask)."""
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    lower, mask = self._lower(x, mask, modality, deterministic, r1)
    c = self.config
    if c.sharing == 'shared':
      upper = self.upper(lower[-1], mask, deterministic=deterministic, rng=r2)
    elif c.sharing == 'separate':
      stage = self.audio_upper if modality == 'audio' else self.visual_upper
      upper = stage(lower[-1], mask, deterministic=deterministic, rng=r2)
    else:
      b, d = x.shape[0], c.dim
      other_t = c.visual_frames if modality == 'audio' else c.audio_tokens
      none = (jnp.zeros((b, other_t, d), lower[-1].dtype), jnp.zeros((b, other_t), bool))
      mine = (lower[-1], mask)
      (a, am), (v, vm) = (mine, none) if modality == 'audio' else (none, mine)
      upper = self._fused(a, am, v, vm, deterministic, r2)
      ta = c.audio_tokens
      upper = [h[:, :ta] if modality == 'audio' else h[:, ta:] for h in upper]
    return lower + upper[1:], mask

  def logits(self, x: jax.Array, mask: jax.Array, modality: str, *, deterministic: bool = True,
             rng: jax.Array | None = None) -> jax.Array:
    """One modality's class logits `[B, K]`."""
    hs, m = self.layers(x, mask, modality, deterministic=deterministic, rng=rng)
    pooled = masked_mean(hs[-1], m)  # [B, D]
    if self.config.sharing == 'separate':
      return (self.audio_head if modality == 'audio' else self.visual_head)(pooled)
    return self.head(pooled)

  # --- both modalities ---------------------------------------------------------------------------

  def _fused(self, a, am, v, vm, deterministic, rng):
    x = jnp.concatenate([a, v], axis=1)  # [B, Ta + Tv, D]
    m = jnp.concatenate([am, vm], axis=1)  # [B, Ta + Tv]
    return self.upper(x, m, deterministic=deterministic, rng=rng)

  def fused_logits(self, audio, audio_mask, visual, visual_mask, *, deterministic: bool = True,
                   rng: jax.Array | None = None) -> jax.Array:
    """'fusion' only: both modalities through the cross-modal attention stage. `[B, K]`."""
    if self.config.sharing != 'fusion':
      raise ValueError(f'fused_logits: sharing={self.config.sharing!r} has no fusion stage')
    ra, rv, ru = (None,) * 3 if rng is None else jax.random.split(rng, 3)
    a, am = self._lower(audio, audio_mask, 'audio', deterministic, ra)
    v, vm = self._lower(visual, visual_mask, 'visual', deterministic, rv)
    hs = self._fused(a[-1], am, v[-1], vm, deterministic, ru)
    return self.head(masked_mean(hs[-1], jnp.concatenate([am, vm], axis=1)))

  def av_logits(self, audio, audio_mask, visual, visual_mask) -> jax.Array:
    """Audio-visual prediction `[B, K]` (deterministic): mean of the two modalities' logits, or
    the fused logits of 'fusion'."""
    if self.config.sharing == 'fusion':
      return self.fused_logits(audio, audio_mask, visual, visual_mask)
    return 0.5 * (self.logits(audio, audio_mask, 'audio')
                  + self.logits(visual, visual_mask, 'visual'))
